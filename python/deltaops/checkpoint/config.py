"""mergekit's YAML merge configuration, read for the per-tensor merge methods.

The subset of mergekit 0.1.5's ``MergeConfiguration`` that deltaops merges
(``mergekit/config.py``, ``parameter_resolver.py``, ``plan.py`` are the
oracle; the tests run the same files through ``mergekit-yaml``)::

    merge_method: ties                 # any of deltaops.merge_tensors' methods
    base_model: ./base                 # local folder
    models:
      - model: ./ft1
        parameters: {weight: 1.0, density: [0.2, 0.5]}   # per model
      - model: ./ft2
        parameters:
          weight: [{filter: mlp, value: 0.3}, {value: 0.7}]
    parameters: {normalize: true, lambda: 1.0}          # global
    dtype: float32                     # inputs are cast to it first
    out_dtype: bfloat16                # the output's dtype
    trim_scope: model                  # deltaops: one top-k over the whole model

Resolution follows mergekit: a parameter is looked up in the model's own
``parameters`` first, then in the global ``parameters``; the first setting
that yields a value wins. A setting is a scalar, a *gradient* (a list of
scalars, interpolated linearly at ``t``; lists of non-numbers pick
``values[int(t * (len - 1))]``), or a list of ``{filter, value}`` rules (the
first rule whose ``filter`` is missing, ``"*"`` or a substring of the tensor
name gives the value). ``t`` is ``i / (num_layers - 1)`` for a tensor of
layer ``i`` (layer index read from ``.layers.<i>.``-style names, the layer
count from config.json's ``num_hidden_layers``) and 0 for tensors outside the
layers (embeddings, final norm, lm_head), as mergekit's planner sets it.

Not read: ``slices``, ``modules``, tokenizer merging (``tokenizer_source``
other than ``base``), LoRA references, ``chat_template``; they raise
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..reference.merge import METHODS, TASK_ARITHMETIC, THRESHOLD_METHODS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}

# Parameters each method reads, as mergekit names them, with their scope:
# "shared" (one value per tensor, global parameters only), "non_base" (per
# fine-tune), "input" (per input, the base included).
_TA_SHARED = {"int8_mask": False, "normalize": None, "rescale": None, "lambda": 1.0}


def _task_arithmetic_parameters(method: str) -> dict:
    sparsification = TASK_ARITHMETIC[method].sparsification
    params = {name: ("shared", default) for name, default in _TA_SHARED.items()}
    params["weight"] = ("non_base", None)  # required, as in mergekit
    params["density"] = ("non_base", 1.0)
    if sparsification == "magnitude_outliers":
        params["gamma"] = ("non_base", 0.01)
    if sparsification == "della":
        params["epsilon"] = ("non_base", 0.15)
    return params


PARAMETERS = {
    "linear": {"weight": ("input", None), "normalize": ("shared", True)},
    "slerp": {"t": ("shared", None)},
    "model_stock": {"filter_wise": ("shared", False)},
    "sce": {"int8_mask": ("shared", False), "select_topk": ("shared", 1.0)},
    **{name: _task_arithmetic_parameters(name) for name in TASK_ARITHMETIC},
}
assert set(PARAMETERS) == set(METHODS)
_BOOL_PARAMETERS = {"int8_mask", "normalize", "rescale", "filter_wise"}
TRIM_SCOPES = ("tensor", "model")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


class ConfigError(ValueError):
    """A merge configuration deltaops cannot read; the message names the key."""


@dataclass
class ModelEntry:
    path: str
    parameters: dict = field(default_factory=dict)


@dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelEntry]
    base_model: Optional[str] = None
    parameters: dict = field(default_factory=dict)
    dtype: Optional[torch.dtype] = None
    out_dtype: Optional[torch.dtype] = None
    trim_scope: str = "tensor"
    source_text: str = ""
    source_dir: str = "."

    # ---- which models play which role -----------------------------------------

    def base_index(self) -> Optional[int]:
        """Index of the base in :meth:`inputs` (mergekit appends it when not listed)."""
        if self.base_model is None:
            return None
        return self.inputs().index(self.base_model)

    def inputs(self) -> list[str]:
        """Every model read, in mergekit's order: the listed ones, then the base if unlisted."""
        paths = [m.path for m in self.models]
        if self.base_model is not None and self.base_model not in paths:
            paths.append(self.base_model)
        return paths

    def non_base(self) -> list[ModelEntry]:
        return [m for m in self.models if m.path != self.base_model]

    def entry(self, path: str) -> Optional[ModelEntry]:
        for m in self.models:
            if m.path == path:
                return m
        return None

    def fingerprint(self) -> str:
        """A hash of everything that decides the output (for --resume)."""
        text = json.dumps({"source": self.source_text, "inputs": self.inputs()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    # ---- parameter resolution ------------------------------------------------------

    def resolve(self, name: str, tensor_name: str, t: float, model: Optional[str] = None):
        """The value of parameter ``name`` for one tensor (and one model), mergekit's rules.

        Returns the method's default when nothing is set; raises
        :class:`ConfigError` when a required parameter is missing.
        """
        scope, default = PARAMETERS[self.merge_method][name]
        sources = []
        if model is not None:
            entry = self.entry(model)
            if entry is not None:
                sources.append(entry.parameters)
        sources.append(self.parameters)
        for settings in sources:
            if name in settings:
                value = evaluate_setting(name, settings[name], tensor_name, t)
                if value is not None:
                    return value
        if default is None and not (name in ("normalize", "rescale")
                                    and self.merge_method in TASK_ARITHMETIC):
            where = f"{model}: {tensor_name}" if model else tensor_name
            raise ConfigError(f"{self.merge_method}: missing required parameter {name!r} "
                              f"for {where}")
        return default

    def is_uniform(self, name: str, model: Optional[str] = None) -> bool:
        """Whether ``name`` is one plain scalar (no gradient, no filter) for ``model``."""
        for settings in ([self.entry(model).parameters] if model and self.entry(model) else []) + [
                self.parameters]:
            if name in settings:
                return isinstance(settings[name], (int, float, bool, str))
        return True


def _validate_scalar(name: str, value):
    if name in _BOOL_PARAMETERS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"parameter {name!r} must be a bool, got {value!r}")
    if isinstance(value, bool):
        return float(value)
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"parameter {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(result):
        raise ConfigError(f"parameter {name!r} must be finite, got {value!r}")
    return result


def evaluate_setting(name: str, setting, tensor_name: str, t: float):
    """One setting (scalar, gradient, or filter rules) evaluated for a tensor at ``t``."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _validate_scalar(name, setting)
    if not isinstance(setting, list):
        raise ConfigError(f"parameter {name!r}: unexpected setting {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [_validate_scalar(name, e) for e in setting]
        if any(isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return _validate_scalar(name, (1 - frac) * values[i0] + frac * values[i1])
    for rule in setting:
        if not isinstance(rule, dict) or "value" not in rule or set(rule) - {"filter", "value"}:
            raise ConfigError(f"parameter {name!r}: a rule must be {{filter, value}}, got {rule!r}")
        flt = rule.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return evaluate_setting(name, rule["value"], tensor_name, t)
    return None


def layer_position(tensor_name: str, num_layers: Optional[int]) -> float:
    """mergekit's ``t`` for a tensor: ``i / (num_layers - 1)`` inside layer ``i``, else 0."""
    match = _LAYER_RE.search(tensor_name)
    if match is None or not num_layers:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return int(match.group(1)) / (num_layers - 1)


def _dtype(key: str, value) -> Optional[torch.dtype]:
    if value is None:
        return None
    if value not in DTYPES:
        raise ConfigError(f"{key} must be one of {', '.join(sorted(DTYPES))}; got {value!r}")
    return DTYPES[value]


def _model_path(value, where: str, source_dir: str) -> str:
    if isinstance(value, dict):  # mergekit's ModelReference as a mapping
        raise ConfigError(f"{where}: only local model folders are supported, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a path, got {value!r}")
    if "+" in value:
        raise ConfigError(f"{where}: LoRA references (model+lora) are not supported: {value!r}")
    path = os.path.expanduser(value)
    if not os.path.isabs(path):
        # mergekit resolves relative paths against the working directory; so do we, and
        # fall back to the config's folder when that is where the model is.
        if not os.path.isdir(path) and os.path.isdir(os.path.join(source_dir, path)):
            path = os.path.join(source_dir, path)
    return os.path.normpath(path)


def parse_config(data: dict, source_text: str = "", source_dir: str = ".") -> MergeConfig:
    """A :class:`MergeConfig` from a parsed YAML mapping; :class:`ConfigError` on what we cannot do."""
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a YAML mapping")
    known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "trim_scope", "tokenizer_source", "name"}
    for key in ("slices", "modules", "tokenizer", "chat_template"):
        if data.get(key):
            raise ConfigError(f"{key!r} is not supported by deltaops merge (use 'models')")
    unknown = sorted(set(data) - known - {"slices", "modules", "tokenizer", "chat_template"})
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
    method = data.get("merge_method")
    if method not in METHODS:
        raise ConfigError(f"merge_method must be one of {', '.join(METHODS)}; got {method!r}")
    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source not in (None, "base"):
        raise ConfigError(f"tokenizer_source {tokenizer_source!r} is not supported "
                          f"(the base's tokenizer files are copied)")
    models_in = data.get("models")
    if not isinstance(models_in, list) or not models_in:
        raise ConfigError("'models' must be a non-empty list of {model, parameters}")
    models = []
    for i, item in enumerate(models_in):
        if not isinstance(item, dict) or "model" not in item:
            raise ConfigError(f"models[{i}] must be a mapping with a 'model' key")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"models[{i}].parameters must be a mapping")
        _check_parameter_names(method, params, f"models[{i}].parameters")
        models.append(ModelEntry(_model_path(item["model"], f"models[{i}].model", source_dir),
                                 dict(params)))
    base = data.get("base_model")
    base = None if base is None else _model_path(base, "base_model", source_dir)
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError("parameters must be a mapping")
    params = dict(params)
    trim_scope = data.get("trim_scope", params.pop("trim_scope", "tensor"))
    if trim_scope not in TRIM_SCOPES:
        raise ConfigError(f"trim_scope must be 'tensor' or 'model'; got {trim_scope!r}")
    if trim_scope == "model" and method not in THRESHOLD_METHODS:
        raise ConfigError(f"trim_scope: model applies to {', '.join(THRESHOLD_METHODS)}; "
                          f"{method} has no magnitude trim")
    _check_parameter_names(method, params, "parameters")
    config = MergeConfig(merge_method=method, models=models, base_model=base, parameters=params,
                         dtype=_dtype("dtype", data.get("dtype")),
                         out_dtype=_dtype("out_dtype", data.get("out_dtype")),
                         trim_scope=trim_scope, source_text=source_text, source_dir=source_dir)
    _check_roles(config)
    return config


def _check_parameter_names(method: str, params: dict, where: str) -> None:
    unknown = sorted(set(params) - set(PARAMETERS[method]))
    if unknown:
        raise ConfigError(f"{where}: {method} does not take {', '.join(unknown)} "
                          f"(it takes {', '.join(sorted(PARAMETERS[method]))})")


def _check_roles(config: MergeConfig) -> None:
    method = config.merge_method
    n_other = len(config.non_base())
    if method in TASK_ARITHMETIC or method in ("slerp", "model_stock", "sce"):
        if config.base_model is None:
            raise ConfigError(f"{method} needs a base_model")
    if method == "slerp" and n_other != 1:
        raise ConfigError(f"slerp merges the base with exactly one other model; got {n_other}")
    if method == "model_stock" and n_other < 2:
        raise ConfigError(f"model_stock needs at least two models besides the base; got {n_other}")
    if len(set(config.inputs())) != len(config.inputs()):
        raise ConfigError("a model is listed twice")


def load_config(path: str) -> MergeConfig:
    import yaml

    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(data, text, os.path.dirname(os.path.abspath(path)))
