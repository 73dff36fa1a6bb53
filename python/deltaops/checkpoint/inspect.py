"""``deltaops info PATH``: what a model folder or a delta folder holds."""

from __future__ import annotations

import os
from collections import Counter

from .compress import MANIFEST, read_manifest
from .io import ModelFolder


def describe(path: str) -> str:
    if os.path.exists(os.path.join(path, MANIFEST)):
        manifest = read_manifest(path)
        kinds = Counter(e["kind"] for e in manifest["tensors"].values())
        size = sum(os.path.getsize(os.path.join(path, f)) for f in manifest["shards"])
        return (f"{path}: deltaops delta ({manifest['delta_format']}, options "
                f"{manifest['options']}); {len(manifest['tensors'])} tensors "
                f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); "
                f"{len(manifest['shards'])} shard(s), {size / 1e9:.3f} GB")
    folder = ModelFolder(path)
    files = sorted({i.file for i in folder.tensors.values()})
    params = sum(i.numel for i in folder.tensors.values())
    dtypes = Counter(str(i.dtype).replace("torch.", "") for i in folder.tensors.values())
    size = sum(i.nbytes for i in folder.tensors.values())
    layers = folder.num_layers()
    return (f"{path}: {len(folder.tensors)} tensors, {params / 1e6:.1f}M parameters "
            f"({', '.join(f'{n} {d}' for d, n in sorted(dtypes.items()))}), {size / 1e9:.3f} GB "
            f"in {len(files)} shard(s)" + (f", {layers} layers" if layers else "")
            + (f"; side files: {', '.join(folder.side_files())}" if folder.side_files() else ""))
