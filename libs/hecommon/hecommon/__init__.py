"""hecommon: the linearly homomorphic RLWE scheme, quantization and wire format of helora."""

__version__ = "0.1.0"
