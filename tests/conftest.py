"""Test configuration shared by every family.

Triton kernels run on CPU tensors through the interpreter, which has to be
switched on before triton is first imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_and_auto_backend(monkeypatch):
    """Every test starts from the same torch seed and the automatic backend choice."""
    monkeypatch.delenv("DELTAOPS_BACKEND", raising=False)
    torch.manual_seed(0)
    yield
