"""crossgrad: decentralized deep learning on non-IID data (NGC, CompNGC, DSGD, QGM, CGA)."""

__version__ = "0.1.0"
