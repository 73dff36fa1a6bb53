"""Run one op on every backend that can run here and compare it with the reference."""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

import deltaops
from deltaops import backends

from tolerances import assert_bitwise_equal


def cpu_backends() -> list[str]:
    """Backends other than the reference that run on CPU tensors on this machine."""
    names = []
    if backends.get("cpu").usable:
        names.append("cpu")
    if os.environ.get("TRITON_INTERPRET") == "1" and backends.get("triton").usable:
        names.append("triton")
    return names


def cpu_kernel_tables() -> list[str]:
    """The C++ kernel tables this CPU runs: "avx2" always, "avx512" where supported
    (deltaops._C._set_isa picks one; tests run each)."""
    try:
        import deltaops._C as C
    except ImportError:
        return []
    names = ["avx2"]
    try:
        C._set_isa("avx512")
        names.append("avx512")
    except ValueError:
        pass
    C._set_isa("auto")
    return names


def required_backends() -> list[str]:
    """Backends the suite insists on (DELTAOPS_REQUIRE=cpu,triton in CI)."""
    return [b for b in os.environ.get("DELTAOPS_REQUIRE", "").split(",") if b]


KERNEL_BACKENDS = pytest.mark.parametrize("backend", ["cpu", "triton"])


def skip_unless_usable(backend: str) -> None:
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    status = backends.get(backend)
    if not status.usable:
        if backend in required_backends():
            pytest.fail(f"backend {backend} is required here but unusable: {status.reason}")
        pytest.skip(f"backend {backend} unavailable: {status.reason}")


def run_on(backend: str, fn: Callable, *args, **kwargs):
    with deltaops.use_backend(backend):
        return fn(*args, **kwargs)


def compare_with_reference(backend: str, fn: Callable, *args, clone_args=False, what="", **kwargs):
    """Run ``fn`` on ``backend`` and on the reference; results must match bit for bit.

    With ``clone_args`` the tensor arguments are cloned for each run and the
    (mutated) first argument is compared instead of the return value.
    """
    skip_unless_usable(backend)

    def call(name):
        call_args = [a.clone() if clone_args and isinstance(a, torch.Tensor) else a for a in args]
        out = run_on(name, fn, *call_args, **kwargs)
        return call_args[0] if clone_args else out

    expected = call("reference")
    actual = call(backend)
    if isinstance(expected, (tuple, list)):
        for a, e in zip(actual, expected):
            assert_bitwise_equal(a, e, what)
    else:
        assert_bitwise_equal(actual, expected, what)
    return actual
