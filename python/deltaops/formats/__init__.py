"""Delta storage formats: each knows how to apply itself and to save and load through safetensors."""

from .quant import QuantizedDelta, SignDelta, TernaryDelta, load_quantized
from .sparse import SparseDelta

__all__ = ["QuantizedDelta", "SignDelta", "SparseDelta", "TernaryDelta", "load_quantized"]
