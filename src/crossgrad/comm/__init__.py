from crossgrad.comm.base import Comm, EdgePlan
from crossgrad.comm.local import LocalComm

__all__ = ["Comm", "EdgePlan", "LocalComm"]
