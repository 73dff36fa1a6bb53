"""``torchrun --nproc_per_node=2 -m deltaops merge`` (gloo) writes the same bytes as one process.

Two configurations: TIES with ``trim_scope: model`` (histograms all-reduced
across the ranks) and DARE-TIES (per-tensor Philox seeds, independent of which
rank merges a tensor). Small shards so that both ranks get work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from deltaops.checkpoint.distributed import assign
from deltaops.checkpoint.family import make_family
from deltaops.cli import main as cli


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return make_family(str(root), params=200_000, dtype=torch.bfloat16, shard_size=300_000)


def _files(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


@pytest.mark.parametrize("method, extra", [("ties", {"trim_scope": "model"}), ("dare_ties", {})])
def test_two_gloo_ranks_match_one_process(tmp_path, family, method, extra):
    config = {"merge_method": method, "base_model": family[0], **extra,
              "models": [{"model": p, "parameters": {"weight": w, "density": d}}
                         for p, w, d in zip(family[1:], (1.0, 0.6, 0.3), (0.3, 0.5, 0.2))]}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    cli(["merge", str(path), single, "--quiet", "--shard-size", "150KB", "--seed", "5"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "deltaops", "merge", str(path), multi, "--quiet", "--shard-size", "150KB",
               "--seed", "5", "--threads", "1"]
    # torchrun's module form (the console script's interpreter may be another venv's); its own
    # session, so that a hang kills the workers too.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tensors in" in result.stderr  # rank 0's summary
    a, b = _files(single), _files(multi)
    assert sorted(a) == sorted(b)
    assert len([f for f in a if f.endswith(".safetensors")]) >= 4
    for name in a:
        assert a[name] == b[name], name


def test_assignment_balances_and_covers():
    sizes = [100, 90, 80, 10, 10, 5]
    owner = assign(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(2)]
    assert sorted(owner) == sorted(owner) and set(owner) == {0, 1}
    assert abs(load[0] - load[1]) <= max(sizes)  # greedy largest-first bound
    assert assign(sizes, 1) == [0] * len(sizes)
