"""Delta storage formats: each knows how to apply itself and to save and load through safetensors."""

from .sparse import SparseDelta

__all__ = ["SparseDelta"]
