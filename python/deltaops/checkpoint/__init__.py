"""Whole checkpoints: streaming merge, compress and apply of Hugging Face model folders.

* :mod:`.config`: mergekit's YAML merge configuration (methods, per-model
  parameters, gradients, filters).
* :mod:`.io`: safetensors shards read one tensor at a time through memory
  mappings, written shard by shard with the HF index, into a temporary folder
  moved into place when complete.
* :mod:`.merge`: ``deltaops merge`` (and ``trim_scope: model``).
* :mod:`.distributed`: the same merge split over torchrun ranks.
* :mod:`.compress`: ``deltaops compress`` / ``deltaops apply`` and the table
  of delta formats.
* :mod:`.family`: generated model families for tests, demo and benchmarks.
"""

from .config import ConfigError, MergeConfig, load_config, parse_config
from .io import CheckpointError, ModelFolder
from .merge import RunOptions, run_merge

__all__ = ["CheckpointError", "ConfigError", "MergeConfig", "ModelFolder", "RunOptions",
           "load_config", "parse_config", "run_merge"]
