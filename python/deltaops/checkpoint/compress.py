"""Whole-model delta compression and application: ``deltaops compress`` / ``deltaops apply``.

``compress`` streams the base ``B`` and the fine-tune ``F`` tensor by tensor,
encodes each weight's delta ``fp32(F) - fp32(B)`` with a *delta format* from
:data:`FORMATS`, and writes a delta folder:

* ``delta_manifest.json``: the container's format name and version, the delta
  format and its options, a fingerprint of the base (tensor names, shapes and
  dtypes), and per tensor its kind (the format's name, or ``copy``), shape,
  dtype, the format's metadata and the safetensors keys of its parts;
* ``delta-XXXXX-of-YYYYY.safetensors``: the parts, keyed ``<tensor>::<part>``;
* the fine-tune's config and tokenizer files, so ``apply`` rebuilds a whole
  model folder.

Tensors with fewer than two dimensions (norms, biases), or fewer than
``min_numel`` elements, and tensors the base lacks are stored whole (kind
``copy``): they are a negligible share of the bytes and exact.

``apply`` reads the base and the delta folder and writes ``B + decode(delta)``
per tensor (fp32 arithmetic, one rounding to the fine-tune's dtype), streamed
shard by shard like ``merge``.

Adding a format
---------------
A format is an object with ``name``, ``option_names`` (the CLI options it
reads, see :func:`deltaops.cli`; any other option given is an error),
``defaults`` (option values when not given), ``resolve(options, given)``
returning the checked options (``CheckpointError`` for a bad value; they are
recorded in the manifest), ``encode(delta, options, threshold)`` returning
``(parts: dict[str, Tensor], meta: dict)``, and ``apply(weight, parts,
meta)`` adding the decoded delta into ``weight`` in place through the
format's fused path. Register it in :data:`FORMATS`. Registered: ``sparse``
(here) and ``sign``, ``ternary``, ``int4``, ``int2``, ``lowrank``
(:mod:`deltaops.checkpoint.formats`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import save_file

from ..formats.sparse import SparseDelta
from ..ops.sparse import apply_delta_, threshold_mask, topk_mask
from ..reference.sparse import magnitude_k
from . import io
from .config import MergeConfig, ModelEntry
from .distributed import Group
from .formats import FORMATS as EXTRA_FORMATS
from .io import CheckpointError, ModelFolder, OutputFolder, PlannedTensor, ShardPlan
from .merge import FLOAT_DTYPES, MergeJob, RunOptions, Summary, _progress, peak_rss_bytes

MANIFEST = "delta_manifest.json"
CONTAINER = "deltaops.checkpoint-delta"
CONTAINER_VERSION = 1


# ---- the format table ------------------------------------------------------------------


class SparseFormat:
    """Top-k by magnitude (:func:`deltaops.topk_mask`), stored as a :class:`deltaops.SparseDelta`.

    Options: ``density`` (fraction kept per tensor, or over the whole model
    with ``trim_scope="model"``), ``layout`` (``coo``, ``bitmask`` or ``auto``:
    coo below 1/32 density, where its 4-byte indices beat one bit per
    element), ``values_dtype`` (default: the model's dtype; ``float32`` keeps
    the kept elements of a bf16/fp16 delta exact).
    """

    name = "sparse"
    option_names = ("density", "layout", "values_dtype", "trim_scope")
    defaults = {"density": 0.1, "layout": "auto", "values_dtype": None, "trim_scope": "tensor"}
    supports_model_scope = True

    def resolve(self, options: dict, given: dict) -> dict:
        density = options["density"]
        if isinstance(density, bool) or not isinstance(density, (int, float)) or \
                not 0.0 <= density <= 1.0:
            raise CheckpointError(f"density must be in [0, 1], got {density}")
        if options["layout"] not in ("auto", "coo", "bitmask"):
            raise CheckpointError(f"--layout must be auto, coo or bitmask; got {options['layout']!r}")
        return options

    def encode(self, delta: torch.Tensor, options: dict, threshold=None):
        if threshold is not None:
            keep = threshold_mask(delta, *threshold)
        else:
            keep = topk_mask(delta, k=magnitude_k(options["density"], delta.numel()))
        layout = options.get("layout", "auto")
        if layout == "auto":
            layout = "coo" if options["density"] < 1 / 32 else "bitmask"
        values = delta.to(options["values_dtype"])
        sparse = SparseDelta.from_mask(values, keep, layout)
        parts = {"values": sparse.values}
        if layout == "coo":
            parts["indices"] = sparse.indices
        else:
            parts["packed_mask"] = sparse.packed_mask
        return parts, {"layout": layout, "nnz": sparse.nnz}

    def apply(self, weight: torch.Tensor, parts: dict, meta: dict) -> None:
        sparse = SparseDelta(weight.shape, meta["layout"], parts["values"],
                             indices=parts.get("indices"), packed_mask=parts.get("packed_mask"))
        apply_delta_(weight, sparse)


FORMATS = {"sparse": SparseFormat(), **EXTRA_FORMATS}
# Every format option of CompressOptions; a format reads the ones in its option_names.
FORMAT_OPTIONS = ("density", "layout", "values_dtype", "trim_scope", "method", "alpha", "rank",
                  "group_size", "symmetric", "granularity", "seed")


def get_format(name: str):
    if name in FORMATS:
        return FORMATS[name]
    raise CheckpointError(f"unknown delta format {name!r}; available: {', '.join(FORMATS)}")


def resolve_options(fmt, options: "CompressOptions") -> dict:
    """The options ``fmt`` reads, defaults filled in and checked; an option given that the
    format does not read is an error (so ``--rank`` with ``--format int4`` is not ignored)."""
    given = {}
    for key in FORMAT_OPTIONS:
        value = getattr(options, key)
        # None / False / trim_scope "tensor" are "not given" (every format trims per tensor)
        if value is None or value is False or (key == "trim_scope" and value == "tensor"):
            continue
        if key not in fmt.option_names:
            reads = ", ".join("--" + k.replace("_", "-") for k in fmt.option_names)
            raise CheckpointError(f"--{key.replace('_', '-')} does not apply to --format {fmt.name} "
                                  f"(it reads: {reads})")
        given[key] = value
    return fmt.resolve({**fmt.defaults, **given}, given)


# ---- compress --------------------------------------------------------------------------


def _fingerprint(folder: ModelFolder) -> str:
    items = [[n, list(i.shape), str(i.dtype)] for n, i in sorted(folder.tensors.items())]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


@dataclass
class CompressOptions:
    """What ``deltaops compress`` was asked; ``None`` (or False) options take the format's
    default (see each format's ``defaults``)."""

    format: str = "sparse"
    density: Optional[float] = None
    layout: Optional[str] = None
    values_dtype: Optional[str] = None
    trim_scope: str = "tensor"
    method: Optional[str] = None       # ternary: absmean | compeft; lowrank: svd | randomized
    alpha: Optional[float] = None      # ternary compeft: scale multiplier
    rank: Optional[int] = None         # lowrank
    group_size: Optional[int] = None   # int4 / int2 (-1: one group per row)
    symmetric: bool = False            # int4 / int2
    granularity: Optional[str] = None  # sign: tensor | row
    seed: Optional[int] = None         # lowrank randomized
    min_numel: int = 1024
    shard_size: int = 2 * 1024**3


def run_compress(base_path: str, finetuned_path: str, out_dir: str, options: CompressOptions,
                 run: RunOptions) -> Summary:
    start = time.perf_counter()
    io.STATS.bytes_read = io.STATS.bytes_written = 0
    if run.threads:
        torch.set_num_threads(run.threads)
    fmt = get_format(options.format)
    fmt_options = resolve_options(fmt, options)
    if "values_dtype" in fmt_options:
        io_dtype(fmt_options["values_dtype"])  # a bad name fails before anything is read
    base = ModelFolder(base_path)
    tuned = ModelFolder(finetuned_path)
    names = tuned.names()
    thresholds = None
    trim_scope = fmt_options.get("trim_scope", options.trim_scope)
    if trim_scope == "model":
        if not getattr(fmt, "supports_model_scope", False):
            raise CheckpointError(f"format {fmt.name} has no whole-model trim")
        # The whole-model top-k of the merge (TIES/ComPEFT's k over all tensors), for one model.
        config = MergeConfig("ties", [ModelEntry(tuned.path, {"weight": 1.0, "density": fmt_options["density"]})],
                             base_model=base.path, trim_scope="model")
        job = MergeJob(config, run)
        thresholds = {n: t[0] for n, t in job.model_thresholds(Group(), job.names).items()}
    elif trim_scope != "tensor":
        raise CheckpointError(f"trim_scope must be 'tensor' or 'model', got {trim_scope!r}")
    record = {"base": _fingerprint(base), "finetuned": _fingerprint(tuned),
              "options": options.__dict__}
    output = OutputFolder(out_dir, record, resume=None, overwrite=run.overwrite)
    entries = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    shard_files: list[str] = []
    summary = Summary()
    progress = _progress(sum(tuned.info(n).nbytes for n in names), f"compress ({fmt.name})", run.quiet)

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            file = f"delta-{len(shard_files) + 1:05d}.safetensors"
            save_file(pending, output.file(file), metadata={"format": CONTAINER})
            io.STATS.wrote(pending_bytes)
            shard_files.append(file)
            for key in pending:
                entries[key.split("::")[0]]["file"] = file
            pending, pending_bytes = {}, 0

    for name in names:
        info = tuned.info(name)
        value = tuned.read(name)
        kind = "copy"
        if name in base.tensors:
            binfo = base.info(name)
            if binfo.shape != info.shape:
                raise CheckpointError(f"tensor {name!r}: shape {list(info.shape)} in {info.file} "
                                      f"differs from {list(binfo.shape)} in {binfo.file}")
            if (info.dtype in FLOAT_DTYPES and binfo.dtype in FLOAT_DTYPES and value.dim() >= 2
                    and value.numel() >= options.min_numel):
                kind = fmt.name
        entry = {"kind": kind, "shape": list(info.shape), "dtype": io.ST_NAMES[info.dtype]}
        if kind == "copy":
            parts = {"value": value.clone()}
        else:
            b = base.read(name)
            if bool(torch.isnan(value).any()) or bool(torch.isnan(b).any()):
                bad = info.file if bool(torch.isnan(value).any()) else base.info(name).file
                raise CheckpointError(f"{bad}: tensor {name!r} contains NaN")
            delta = value.float() - b.float()
            del b
            opts = dict(fmt_options)
            if "values_dtype" in opts:
                opts["values_dtype"] = io_dtype(opts["values_dtype"]) or info.dtype
            try:
                parts, meta = fmt.encode(delta, opts, None if thresholds is None else thresholds[name])
            except (ValueError, TypeError) as error:
                raise CheckpointError(f"tensor {name!r} of {info.file}: {fmt.name} encoding "
                                      f"failed: {error}") from error
            entry["meta"] = meta
        del value
        entry["parts"] = sorted(parts)
        entries[name] = entry
        for part, tensor in parts.items():
            pending[f"{name}::{part}"] = tensor.contiguous()
            pending_bytes += tensor.numel() * tensor.element_size()
        summary.tensors += 1
        if progress is not None:
            progress.update(info.nbytes)
        if pending_bytes >= options.shard_size:
            flush()
    flush()
    if progress is not None:
        progress.close()
    manifest = {"format": CONTAINER, "version": CONTAINER_VERSION, "delta_format": fmt.name,
                "options": {**fmt_options, "min_numel": options.min_numel},
                "base_fingerprint": record["base"], "shards": shard_files, "tensors": entries}
    with open(output.file(MANIFEST), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    io.copy_side_files(tuned, output.partial, None)
    output.finish()
    summary.seconds = time.perf_counter() - start
    summary.bytes_read = io.STATS.bytes_read
    summary.bytes_written = io.STATS.bytes_written
    summary.peak_rss = peak_rss_bytes()
    return summary


def io_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    from .config import DTYPES

    if name not in DTYPES:
        raise CheckpointError(f"values dtype must be one of {', '.join(sorted(DTYPES))}; got {name!r}")
    return DTYPES[name]


# ---- apply -------------------------------------------------------------------------------


def read_manifest(delta_dir: str) -> dict:
    path = os.path.join(delta_dir, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{delta_dir}: not a deltaops delta folder ({MANIFEST} is missing)")
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("format") != CONTAINER:
        raise CheckpointError(f"{path}: not a deltaops delta manifest")
    if manifest.get("version") != CONTAINER_VERSION:
        raise CheckpointError(f"{path}: delta container version {manifest.get('version')} is not "
                              f"supported (this deltaops reads {CONTAINER_VERSION})")
    return manifest


def run_apply(base_path: str, delta_dir: str, out_dir: str, run: RunOptions) -> Summary:
    start = time.perf_counter()
    io.STATS.bytes_read = io.STATS.bytes_written = 0
    if run.threads:
        torch.set_num_threads(run.threads)
    manifest = read_manifest(delta_dir)
    base = ModelFolder(base_path)
    if _fingerprint(base) != manifest["base_fingerprint"]:
        raise CheckpointError(f"{base_path}: this is not the base the delta was made from "
                              f"(tensor names, shapes or dtypes differ)")
    delta = ModelFolder.__new__(ModelFolder)
    delta.path, delta.tensors = delta_dir, {}
    delta._read_files([os.path.join(delta_dir, f) for f in manifest["shards"]])
    entries = manifest["tensors"]
    planned = [PlannedTensor(n, tuple(e["shape"]), io.ST_DTYPES[e["dtype"]]) for n, e in entries.items()]
    plan = ShardPlan(planned, run.shard_size)
    output = OutputFolder(out_dir, {"delta": manifest["base_fingerprint"]}, resume=None,
                          overwrite=run.overwrite)
    summary = Summary()
    progress = _progress(plan.total_bytes, "apply", run.quiet)

    def produce(p: PlannedTensor) -> torch.Tensor:
        entry = entries[p.name]
        parts = {part: delta.read(f"{p.name}::{part}") for part in entry["parts"]}
        if entry["kind"] == "copy":
            out = parts["value"]
        else:
            fmt = get_format(entry["kind"])
            weight = base.read(p.name).to(p.dtype)  # a private mapping: writable, the file untouched
            try:
                fmt.apply(weight, parts, entry.get("meta", {}))
            except (ValueError, TypeError, KeyError) as error:
                raise CheckpointError(f"{delta_dir}: the {fmt.name} delta of tensor {p.name!r} "
                                      f"is corrupt: {error!r}") from error
            out = weight
        summary.tensors += 1
        if progress is not None:
            progress.update(p.nbytes)
        return out

    for shard in plan.shards:
        io.write_shard(output.partial, shard, produce)
    if progress is not None:
        progress.close()
    plan.write_index(output.partial)
    for name in os.listdir(delta_dir):
        full = os.path.join(delta_dir, name)
        if os.path.isfile(full) and name != MANIFEST and not name.endswith(".safetensors"):
            with open(full, "rb") as src, open(output.file(name), "wb") as dst:
                dst.write(src.read())
    output.finish()
    summary.seconds = time.perf_counter() - start
    summary.bytes_read = io.STATS.bytes_read
    summary.bytes_written = io.STATS.bytes_written
    summary.peak_rss = peak_rss_bytes()
    return summary
