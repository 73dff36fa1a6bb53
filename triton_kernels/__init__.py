"""Triton kernels of deltaops (installed as ``deltaops.triton_kernels``).

* :mod:`.philox`: Philox4x32-10 keyed as ``csrc/include/deltaops/philox.h``.
* :mod:`.sparse`: the sparse-delta family (``docs/backend-contract.md``); the
  ``triton`` backend's table is ``sparse.__all__``.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before
triton is imported). Importing this package needs triton; the backend loader
reports the ImportError as the reason the backend is unavailable.
"""

from . import philox, quant, sparse

__all__ = ["philox", "quant", "sparse"]
