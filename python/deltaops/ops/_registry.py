"""One place that turns a typed reference signature into a ``torch.ops.deltaops`` op.

Each op is a ``torch.library.custom_op``:

* its default implementation is the reference (any device),
* ``register_kernel("cpu")`` and ``register_kernel("cuda")`` route through
  :func:`deltaops.backends.resolve`, which honours ``DELTAOPS_BACKEND`` and
  :func:`deltaops.use_backend` and falls back in ``auto`` mode,
* a fake implementation, so ``torch.compile(fullgraph=True)`` and
  ``torch.export`` trace through it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import backends

OPS: dict[str, torch.library.CustomOpDef] = {}


def _routed(name: str, device_type: str) -> Callable:
    def kernel(*args, **kwargs):
        return backends.resolve(name, device_type)(*args, **kwargs)

    kernel.__name__ = f"{name}_{device_type}"
    return kernel


def define(name: str, reference: Callable, fake: Callable,
           mutates_args: Sequence[str] = ()) -> torch.library.CustomOpDef:
    """Define ``torch.ops.deltaops.<name>`` with ``reference`` (typed) as its default."""
    op = torch.library.custom_op(f"deltaops::{name}", mutates_args=tuple(mutates_args))(reference)
    for device_type in ("cpu", "cuda"):
        op.register_kernel(device_type)(_routed(name, device_type))
    op.register_fake(fake)
    OPS[name] = op
    return op
