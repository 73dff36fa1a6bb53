"""Streaming whole-checkpoint merge: ``deltaops merge CONFIG.yml OUT_DIR``.

One output tensor at a time: the N+1 input tensors are read into one reusable
buffer per model, cast to the config's ``dtype`` if it has one, merged by
:func:`deltaops.merge_tensors` and streamed into the output shard (written by
a thread while the next tensor is merged), so the resident set stays near
N+3 times the largest tensor whatever the model's size.

``trim_scope: model`` (ties, breadcrumbs, breadcrumbs_ties) selects each
model's top-k over all of that model's tensors, as the TIES paper defines the
trim, in streaming passes and never with a flattened copy of the model:

1. the level-0 radix histogram of every tensor's fp32 delta, summed over the
   model (and all-reduced over ranks), locates the bucket of the k-th largest
   magnitude;
2. the level-1 histograms inside that bucket give the exact key ``T`` and how
   many elements equal to ``T`` are kept; those are dealt to the tensors in
   output order (:func:`deltaops.reference.merge.topk_thresholds`' rule), each
   taking at most its own count of ``T``;
3. the merge pass gets each tensor's ``(T, take_equal)`` as ``thresholds=``.

Which elements a tie at ``T`` keeps therefore depends on the tensor order,
which is the output order (the base's storage order).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..ops.merge import merge_tensors
from ..ops.sparse import magnitude_histogram
from ..reference.merge import _OPTIONS, KEY_NONE, RANDOM_METHODS, TASK_ARITHMETIC
from ..reference.sparse import magnitude_k, outlier_band
from ..selection import locate
from . import io
from .config import ConfigError, MergeConfig, layer_position
from .distributed import Group, mine
from .io import CheckpointError, ModelFolder, OutputFolder, PlannedTensor, ShardPlan

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class RunOptions:
    device: str = "cpu"
    threads: Optional[int] = None
    shard_size: int = 5 * 1024**3
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    check_nan: str = "output"  # "output": check the result, name the input; "inputs"; "off"


@dataclass
class Summary:
    """What a run did, for the final report (bytes are this process's)."""

    tensors: int = 0
    skipped_shards: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    peak_rss: int = 0  # bytes, this process
    passes: list = field(default_factory=list)

    def line(self) -> str:
        rate = self.bytes_read / self.seconds if self.seconds else 0.0
        return (f"{self.tensors} tensors in {self.seconds:.1f} s; read {human_bytes(self.bytes_read)} "
                f"({human_bytes(rate)}/s), wrote {human_bytes(self.bytes_written)}; "
                f"peak RSS {human_bytes(self.peak_rss)}"
                + (f"; {self.skipped_shards} shard(s) already done (--resume)"
                   if self.skipped_shards else ""))


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_seed(seed: int, name: str) -> int:
    """A seed per tensor, so that random drops differ between tensors of one shape."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def _progress(total: int, desc: str, quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                dynamic_ncols=True, leave=False)


class MergeJob:
    """A parsed config with its models opened and checked, and the output planned."""

    def __init__(self, config: MergeConfig, options: RunOptions):
        self.config = config
        self.options = options
        self.paths = config.inputs()
        self.folders = [ModelFolder(p) for p in self.paths]
        base_index = config.base_index()
        self.base = self.folders[base_index if base_index is not None else 0]
        self.non_base = [i for i, p in enumerate(self.paths) if p != config.base_model]
        self.num_layers = self.base.num_layers()
        self.names = self.base.names()
        self._check_inputs()
        planned = []
        for name in self.names:
            info = self.base.info(name)
            planned.append(PlannedTensor(name, info.shape, self.out_dtype(info.dtype)))
        self.plan = ShardPlan(planned, options.shard_size)
        for name in self.names:  # parameter errors now, not after hours of merging
            if self.base.info(name).dtype in FLOAT_DTYPES:
                self.merge_kwargs(name)

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in FLOAT_DTYPES:
            return dtype  # integer buffers are copied from the base
        return self.config.out_dtype or self.config.dtype or dtype

    def _check_inputs(self) -> None:
        for name in self.names:
            reference = self.base.info(name)
            for folder in self.folders:
                if folder is self.base:
                    continue
                if name not in folder.tensors:
                    raise CheckpointError(f"{folder.path}: tensor {name!r} (in the base, "
                                          f"{reference.file}) is missing from this model")
                info = folder.tensors[name]
                if info.shape != reference.shape:
                    raise CheckpointError(f"tensor {name!r}: shape {list(info.shape)} in "
                                          f"{info.file} differs from {list(reference.shape)} "
                                          f"in {reference.file}")
                if (info.dtype in FLOAT_DTYPES) != (reference.dtype in FLOAT_DTYPES):
                    raise CheckpointError(f"tensor {name!r}: dtype {info.dtype} in {info.file}, "
                                          f"{reference.dtype} in {reference.file}")

    def record(self) -> dict:
        """What decides the output bytes (compared on --resume)."""
        inputs = {}
        for folder in self.folders:
            files = sorted({info.file for info in folder.tensors.values()})
            inputs[folder.path] = [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns]
                                   for f in files]
        return {"config": self.config.fingerprint(), "inputs": inputs, "seed": self.options.seed,
                "shards": [[s.file, s.file_size()] for s in self.plan.shards]}

    # ---- one tensor ---------------------------------------------------------------

    def read_inputs(self, name: str) -> list[torch.Tensor]:
        """Tensor ``name`` of every input, in each folder's reusable buffer (valid until the next call)."""
        tensors = [folder.read_reusing(name) for folder in self.folders]
        device = self.options.device
        if device != "cpu":
            tensors = [t.to(device) for t in tensors]
        if self.config.dtype is not None and tensors[0].dtype in FLOAT_DTYPES:
            tensors = [t.to(self.config.dtype) for t in tensors]
        return tensors

    def _nan_input(self, name: str, tensors: list[torch.Tensor]) -> Optional[str]:
        """The file of the first input whose tensor ``name`` holds a NaN, or None.

        ``max`` propagates NaN and reads the tensor once without a temporary;
        ``isnan(x).any()`` is 3-4x slower on bf16 (it materialises a mask).
        """
        for folder, tensor in zip(self.folders, tensors):
            if tensor.is_floating_point() and tensor.numel() and bool(torch.isnan(tensor.max())):
                return folder.info(name).file
        return None

    def merge_kwargs(self, name: str, thresholds=None) -> dict:
        """merge_tensors' keyword arguments for tensor ``name`` (mergekit's parameter rules)."""
        config, method = self.config, self.config.merge_method
        t = layer_position(name, self.num_layers)
        kwargs: dict = {}
        if method in TASK_ARITHMETIC:
            others = [self.paths[i] for i in self.non_base]
            kwargs["weights"] = [config.resolve("weight", name, t, m) for m in others]
            kwargs["density"] = [config.resolve("density", name, t, m) for m in others]
            if "gamma" in _param_names(config):
                kwargs["gamma"] = [config.resolve("gamma", name, t, m) for m in others]
            if "epsilon" in _param_names(config):
                kwargs["epsilon"] = [config.resolve("epsilon", name, t, m) for m in others]
            kwargs["lambda_"] = config.resolve("lambda", name, t)
            kwargs["normalize"] = config.resolve("normalize", name, t)
            kwargs["rescale"] = config.resolve("rescale", name, t)
            if method in RANDOM_METHODS:
                kwargs["seed"] = tensor_seed(self.options.seed, name)
            if thresholds is not None:
                kwargs["thresholds"] = thresholds
            # mergekit resolves density/rescale for every member of the family and ignores them
            # where nothing is sparsified; merge_tensors rejects unused options instead.
            used = _OPTIONS[method] | {"seed"}
            kwargs = {k: v for k, v in kwargs.items() if k in used}
        elif method == "linear":
            kwargs["weights"] = [config.resolve("weight", name, t, m) for m in self.paths]
            kwargs["normalize"] = config.resolve("normalize", name, t)
        elif method == "slerp":
            kwargs["weights"] = config.resolve("t", name, t)
        elif method == "model_stock":
            if config.resolve("filter_wise", name, t):
                raise ConfigError("model_stock: filter_wise: true is not supported")
        elif method == "sce":
            kwargs["density"] = config.resolve("select_topk", name, t)
        return kwargs

    def merge_one(self, name: str, thresholds=None) -> torch.Tensor:
        tensors = self.read_inputs(name)
        out_dtype = self.out_dtype(tensors[0].dtype)
        if tensors[0].dtype not in FLOAT_DTYPES:
            return tensors[self.folders.index(self.base)].clone()
        base = tensors[self.folders.index(self.base)]
        method = self.config.merge_method
        if method == "linear":
            models = tensors
        else:
            models = [tensors[i] for i in self.non_base]
        kwargs = self.merge_kwargs(name, thresholds)
        if self.options.check_nan == "inputs":
            culprit = self._nan_input(name, tensors)
            if culprit:
                raise CheckpointError(f"{culprit}: tensor {name!r} contains NaN")
        try:
            out = merge_tensors(base, models, method, out_dtype=out_dtype, **kwargs)
        except (ValueError, TypeError) as error:
            culprit = self._nan_input(name, tensors)
            if culprit:
                raise CheckpointError(f"{culprit}: tensor {name!r} contains NaN") from None
            raise CheckpointError(f"tensor {name!r} ({self.base.info(name).file}): {error}") from None
        if self.options.check_nan != "off" and out.numel() and bool(torch.isnan(out.max())):
            # Every method propagates a NaN input into the output (or raises on it), except
            # one a random drop removed before any norm saw it; name the input.
            culprit = self._nan_input(name, tensors)
            if culprit:
                raise CheckpointError(f"{culprit}: tensor {name!r} contains NaN")
            raise CheckpointError(f"tensor {name!r} ({self.base.info(name).file}): the merge "
                                  f"produced NaN from finite inputs")
        if any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in tensors):
            out = out.clone()  # the input buffers are reused for the next tensor
        del tensors, base, models
        return out

    # ---- trim_scope: model --------------------------------------------------------

    def model_ks(self) -> list[list[int]]:
        """Per fine-tune, the whole-model k's: [k] for ties, [n_drop, n_drop + n_keep] for breadcrumbs."""
        config, method = self.config, self.config.merge_method
        total = sum(self.base.info(n).numel for n in self.names
                    if self.base.info(n).dtype in FLOAT_DTYPES)
        ks = []
        for i in self.non_base:
            model = self.paths[i]
            for p in ("density", "gamma"):
                if p in _param_names(config) and not config.is_uniform(p, model):
                    raise ConfigError(f"trim_scope: model needs one {p} per model (no gradient "
                                      f"or filter); {model} has {p} varying by tensor")
            density = config.resolve("density", "", 0.0, model)
            if TASK_ARITHMETIC[method].sparsification == "magnitude_outliers":
                n_drop, n_keep = outlier_band(density, config.resolve("gamma", "", 0.0, model), total)
                ks.append([n_drop, n_drop + n_keep])
            else:
                ks.append([magnitude_k(density, total)])
        return ks

    def _raise_not_finite(self, name: str) -> None:
        tensors = self.read_inputs(name)
        culprit = self._nan_input(name, tensors)
        if culprit:
            raise CheckpointError(f"{culprit}: tensor {name!r} contains NaN")
        raise CheckpointError(f"tensor {name!r} ({self.base.info(name).file}): a delta is "
                              f"infinite (inf in an input, or an overflow)")

    def _deltas(self, name: str) -> list[torch.Tensor]:
        tensors = self.read_inputs(name)
        base = tensors[self.folders.index(self.base)].float()
        return [tensors[i].float() - base for i in self.non_base]

    def model_thresholds(self, group: Group, names: list[str], progress=None) -> dict:
        """``{tensor name: thresholds}`` for :func:`merge_tensors` over the whole model (this rank's tensors)."""
        float_names = [n for n in self.names if self.base.info(n).dtype in FLOAT_DTYPES]
        position = {n: j for j, n in enumerate(float_names)}
        my_names = [n for n in names if n in position]
        ks = self.model_ks()
        n_models = len(self.non_base)
        level0 = torch.zeros(n_models, 1 << 15, dtype=torch.int64)
        for name in my_names:
            for i, delta in enumerate(self._deltas(name)):
                histogram = magnitude_histogram(delta, 0).cpu()
                if histogram[0x7F80:].sum() > 0:  # keys of inf and NaN
                    self._raise_not_finite(name)
                level0[i] += histogram
            if progress is not None:
                progress.update(self.base.info(name).nbytes * (n_models + 1))
        level0 = group.all_reduce_sum(level0)
        # The bucket (high 16 bits) of each k-th key, and the count above it.
        buckets = {}
        for i, model_ks in enumerate(ks):
            if level0[i, 0x7F80:].sum() > 0:  # keys of inf and NaN
                raise CheckpointError(f"{self.paths[self.non_base[i]]}: the delta contains NaN or "
                                      f"inf (a tensor of this model is NaN/inf)")
            for k in model_ks:
                if k > 0:
                    buckets[(i, k)] = locate(level0[i], k)
        prefixes = sorted({(i, b) for (i, _), (b, _) in buckets.items()})
        slot = {key: s for s, key in enumerate(prefixes)}
        level1 = torch.zeros(max(1, len(prefixes)), 1 << 16, dtype=torch.int64)
        per_tensor = {}  # (tensor position, slot) -> (nonzero low bits, counts)
        for name in my_names:
            deltas = self._deltas(name)
            for (i, bucket), s in slot.items():
                h = magnitude_histogram(deltas[i], 1, bucket).cpu()
                level1[s] += h
                nz = h.nonzero().reshape(-1)
                per_tensor[(position[name], s)] = (nz, h[nz])
            if progress is not None:
                progress.update(self.base.info(name).nbytes * (n_models + 1))
        level1 = group.all_reduce_sum(level1)
        # Exact thresholds, then each tensor's count of keys equal to them.
        keys = {}
        for (i, k), (bucket, above) in buckets.items():
            low, above_low = locate(level1[slot[(i, bucket)]], k - above)
            keys[(i, k)] = ((bucket << 16) | low, k - above - above_low)
        order = sorted(keys)
        equal = torch.zeros(len(float_names), max(1, len(order)), dtype=torch.int64)
        for c, (i, k) in enumerate(order):
            key, _ = keys[(i, k)]
            s = slot[(i, key >> 16)]
            low = key & 0xFFFF
            for name in my_names:
                nz, counts = per_tensor[(position[name], s)]
                hit = (nz == low).nonzero()
                if hit.numel():
                    equal[position[name], c] = counts[hit[0, 0]]
        equal = group.all_reduce_sum(equal)
        # Deal take_equal to the tensors in output order.
        pairs = {}
        for c, (i, k) in enumerate(order):
            key, left = keys[(i, k)]
            for j in range(len(float_names)):
                take = min(left, int(equal[j, c]))
                pairs[(j, i, k)] = (key, take)
                left -= take
        result = {}
        breadcrumbs = TASK_ARITHMETIC[self.config.merge_method].sparsification == "magnitude_outliers"
        for name in float_names:
            j = position[name]
            per_model = []
            for i, model_ks in enumerate(ks):
                pair = [(KEY_NONE, 0) if k == 0 else pairs[(j, i, k)] for k in model_ks]
                if breadcrumbs:
                    drop = None if model_ks[0] == 0 else pair[0]
                    per_model.append((drop, pair[1]))
                else:
                    per_model.append(pair[0])
            result[name] = per_model
        return result


def _param_names(config: MergeConfig) -> set:
    from .config import PARAMETERS

    return set(PARAMETERS[config.merge_method])


def run_merge(config: MergeConfig, out_dir: str, options: RunOptions,
              group: Optional[Group] = None) -> Summary:
    """Merge ``config`` into the model folder ``out_dir``; returns this process's :class:`Summary`."""
    start = time.perf_counter()
    io.STATS.bytes_read = io.STATS.bytes_written = 0
    if options.threads:
        torch.set_num_threads(options.threads)
    group = group or Group(options.device)
    if group.device.startswith("cuda"):
        options.device = group.device
    job = MergeJob(config, options)
    summary = Summary()
    record = job.record()
    record["world"] = group.world  # thresholds and shards do not depend on it; the cache does
    output = OutputFolder(out_dir, record, resume=options.resume, overwrite=options.overwrite,
                          create=group.rank == 0)
    group.barrier()
    shards = job.plan.shards
    my_shards = [shards[i] for i in mine([s.nbytes for s in shards], group)]
    todo = [s for s in my_shards if not (options.resume and io.shard_complete(output.partial, s))]
    summary.skipped_shards = len(my_shards) - len(todo)
    quiet = options.quiet or group.rank != 0

    thresholds = None
    if config.trim_scope == "model":
        cache = output.file(f".thresholds-rank{group.rank}.json")
        my_names = [t.name for s in my_shards for t in s.tensors]
        if options.resume and os.path.exists(cache):
            with open(cache, encoding="utf-8") as handle:
                thresholds = _thresholds_from_json(json.load(handle))
        else:
            read = sum(job.base.info(n).nbytes for n in my_names) * (len(job.non_base) + 1) * 2
            progress = _progress(read, "whole-model top-k (2 passes)", quiet)
            thresholds = job.model_thresholds(group, my_names, progress)
            if progress is not None:
                progress.close()
            with open(cache, "w", encoding="utf-8") as handle:
                json.dump(_thresholds_to_json(thresholds), handle)
        summary.passes.append("histograms")

    total = sum(s.nbytes for s in todo)
    progress = _progress(total, f"merge ({config.merge_method})", quiet)

    def produce(planned: PlannedTensor) -> torch.Tensor:
        out = job.merge_one(planned.name, None if thresholds is None else thresholds.get(planned.name))
        summary.tensors += 1
        if progress is not None:
            progress.update(planned.nbytes)
        return out

    syncer = io.Syncer()
    try:
        for shard in todo:
            io.write_shard(output.partial, shard, produce, syncer=syncer)
    finally:
        syncer.wait()
    if progress is not None:
        progress.close()
    group.barrier()
    if group.rank == 0:
        job.plan.write_index(output.partial)
        io.copy_side_files(job.base, output.partial,
                           config.out_dtype or config.dtype)
        if config.source_text:
            with open(output.file("deltaops_merge.yml"), "w", encoding="utf-8") as handle:
                handle.write(config.source_text)
        for leftover in os.listdir(output.partial):
            if leftover.startswith(".thresholds-rank"):
                os.remove(output.file(leftover))
        output.finish()
    group.barrier()
    summary.seconds = time.perf_counter() - start
    summary.bytes_read = io.STATS.bytes_read
    summary.bytes_written = io.STATS.bytes_written
    summary.peak_rss = peak_rss_bytes()
    return summary


def _thresholds_to_json(thresholds: dict) -> dict:
    return thresholds


def _thresholds_from_json(data: dict) -> dict:
    def fix(entry):
        if isinstance(entry, list):
            return tuple(fix(e) for e in entry)
        return entry

    return {name: [fix(e) for e in per_model] for name, per_model in data.items()}
