"""Suite-wide settings.

The tests' models are tiny: with several intra-op threads each small op pays thread start-up and, on
a machine whose cores are busy, spin-waiting for them (a 4-parameter-layer step took 70x longer on
two threads than on one while two other jobs ran). One thread makes the suite's time depend on the
work, not on the load. Tests that care about threads set them themselves; subprocesses keep torch's
default.
"""
import torch

torch.set_num_threads(1)
