"""deltaops: fused kernels for weight-delta arithmetic.

Merging fine-tunes (task arithmetic, TIES, DARE, ...), compressing their deltas
(sparse, 1-bit, ternary, low-bit, low-rank) and applying them to base weights,
with a pure-torch reference for every op and C++, Triton and CUDA kernels
behind ``torch.ops.deltaops``. See README.md for the ops x backends table.
"""

from .backends import BackendUnavailableError, use_backend
from .formats.lowrank import LowRankDelta
from .formats.quant import QuantizedDelta, SignDelta, TernaryDelta, load_quantized
from .formats.sparse import SparseDelta
from .ops.lowrank import lora_expand, lora_merge_, lora_shrink, lora_unmerge_, low_rank
from .ops.merge import merge_tensors
from .ops.quant import (
    delta_bmm,
    pack_bits,
    quantize_sign,
    quantize_ternary,
    quantize_uniform,
    unpack_bits,
)
from .ops.sparse import (
    DeltaUndo,
    apply_delta_,
    dare,
    magnitude_histogram,
    random_uniform_like,
    sparsify,
    threshold_mask,
    topk_mask,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DeltaUndo",
    "LowRankDelta",
    "QuantizedDelta",
    "SignDelta",
    "SparseDelta",
    "TernaryDelta",
    "apply_delta_",
    "dare",
    "delta_bmm",
    "load_quantized",
    "lora_expand",
    "lora_merge_",
    "lora_shrink",
    "lora_unmerge_",
    "low_rank",
    "magnitude_histogram",
    "merge_tensors",
    "pack_bits",
    "quantize_sign",
    "quantize_ternary",
    "quantize_uniform",
    "random_uniform_like",
    "sparsify",
    "threshold_mask",
    "topk_mask",
    "unpack_bits",
    "use_backend",
]
