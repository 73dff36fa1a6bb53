"""Public merge op: ``deltaops.merge_tensors``.

For now it runs the pure-torch reference (:mod:`deltaops.reference.merge`:
fp32 arithmetic, sums in model order, the sparse family's top-k tie rule) on
every device: correct, but eager-speed. The fused single-pass kernels (CPU,
Triton, CUDA) that replace it are the next step of the merge issue.
"""

from ..reference.merge import METHODS, merge_tensors, topk_thresholds

__all__ = ["METHODS", "merge_tensors", "topk_thresholds"]
