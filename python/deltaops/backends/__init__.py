"""Backend selection: which implementation runs each op on each device.

Backends, each a table ``{op name: callable}`` loaded on first use:

* ``reference``: the pure-torch specification (:mod:`deltaops.reference`);
  runs anywhere.
* ``cpu``: the C++ extension ``deltaops._C`` (CPU tensors).
* ``triton``: :mod:`deltaops.triton_kernels` (CUDA tensors; CPU tensors only
  under ``TRITON_INTERPRET=1``, which is how the CPU machines test it).
* ``cuda``: the CUDA extension ``deltaops._C_cuda`` (CUDA tensors).

Choice: ``DELTAOPS_BACKEND=reference|cpu|triton|cuda|auto`` or
:func:`use_backend`. A backend that is asked for and cannot run raises
:class:`BackendUnavailableError` with the reason; in ``auto`` mode a missing
backend falls back to the next (cpu -> reference on CPU tensors, cuda ->
triton -> reference on CUDA tensors) and the reason is logged once.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

log = logging.getLogger("deltaops")

BACKENDS = ("reference", "cpu", "triton", "cuda")
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
# The device types on which each backend can run (triton on cpu: interpreter only).
DEVICES = {"reference": ("cpu", "cuda"), "cpu": ("cpu",), "triton": ("cuda", "cpu"),
           "cuda": ("cuda",)}

# Python modules whose public functions make up each Python-level backend.
_REFERENCE_MODULES = ("deltaops.reference.sparse", "deltaops.reference.lowrank")
_TRITON_MODULES = ("deltaops.triton_kernels.sparse", "deltaops.triton_kernels.merge",
                   "deltaops.triton_kernels.lowrank")

_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("deltaops_backend",
                                                                       default=None)


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for explicitly cannot run this op here."""


@dataclass
class Backend:
    name: str
    table: dict[str, Callable] = field(default_factory=dict)
    reason: str = ""  # why it is not usable; empty when it is

    @property
    def usable(self) -> bool:
        return not self.reason


def _functions_of(module_names) -> dict[str, Callable]:
    table = {}
    for name in module_names:
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        table.update({n: getattr(module, n) for n in exported if callable(getattr(module, n))})
    return table


def _extension_functions(module_name: str) -> dict[str, Callable]:
    module = importlib.import_module(module_name)
    return {n: getattr(module, n) for n in dir(module) if not n.startswith("_")}


def _load(name: str) -> Backend:
    try:
        if name == "reference":
            return Backend(name, _functions_of(_REFERENCE_MODULES))
        if name == "cpu":
            return Backend(name, _extension_functions("deltaops._C"))
        if name == "triton":
            import triton  # noqa: F401  (a clear reason when triton is missing)

            return Backend(name, _functions_of(_TRITON_MODULES))
        if name == "cuda":
            import torch

            table = _extension_functions("deltaops._C_cuda")
            if not torch.cuda.is_available():
                return Backend(name, table, "built, but torch sees no CUDA device")
            return Backend(name, table)
    except ImportError as error:  # not built, or a dependency is missing
        return Backend(name, reason=f"{type(error).__name__}: {error}")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


_cache: dict[str, Backend] = {}


def get(name: str) -> Backend:
    """The loaded backend ``name`` (its table, or the reason it is unusable)."""
    if name not in _cache:
        _cache[name] = _load(name)
    return _cache[name]


def selected() -> str:
    """The backend asked for now: ``use_backend`` wins over ``DELTAOPS_BACKEND``."""
    choice = _selected.get() or os.environ.get("DELTAOPS_BACKEND", "auto") or "auto"
    if choice != "auto" and choice not in BACKENDS:
        raise ValueError(f"DELTAOPS_BACKEND={choice!r}: expected auto or one of {BACKENDS}")
    return choice


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops in this block on backend ``name`` (or ``"auto"``)."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected auto or one of {BACKENDS}")
    token = _selected.set(name)
    try:
        yield
    finally:
        _selected.reset(token)


def _why_not(name: str, op: str, device_type: str) -> str:
    """Empty if backend ``name`` can run ``op`` on ``device_type``; else the reason."""
    if device_type not in DEVICES.get(name, ()):
        return f"backend {name!r} does not run on {device_type} tensors"
    if name == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    backend = get(name)
    if not backend.usable:
        return f"backend {name!r} is unavailable ({backend.reason})"
    if op not in backend.table:
        return f"backend {name!r} has no kernel for {op!r}"
    return ""


_logged: set[tuple] = set()


def resolve(op: str, device_type: str) -> Callable:
    """The implementation of ``op`` for tensors on ``device_type`` under the current choice."""
    choice = selected()
    if choice != "auto":
        reason = _why_not(choice, op, device_type)
        if reason:
            raise BackendUnavailableError(f"deltaops.{op}: {reason}")
        return get(choice).table[op]
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        reason = _why_not(name, op, device_type)
        if not reason:
            return get(name).table[op]
        key = (op, device_type, name)
        if key not in _logged:
            _logged.add(key)
            log.info("deltaops.%s on %s: skipping %s: %s", op, device_type, name, reason)
    raise BackendUnavailableError(f"deltaops.{op}: no backend can run on {device_type} tensors")


def status() -> dict[str, Backend]:
    """Every backend, loaded: used by ``python -m deltaops.info``."""
    return {name: get(name) for name in BACKENDS}
