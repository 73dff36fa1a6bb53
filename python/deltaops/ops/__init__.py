"""Public ops, one module per family: argument checks, then ``torch.ops.deltaops``."""
