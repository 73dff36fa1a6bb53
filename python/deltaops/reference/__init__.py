"""Pure-torch references: the specification of every deltaops op.

One module per family. Tests and benchmarks import the references from here;
nothing else defines the semantics.
"""

from . import merge, philox, quant, sparse

__all__ = ["merge", "philox", "quant", "sparse"]
