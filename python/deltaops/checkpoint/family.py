"""Generated model families for tests, the demo and the benchmarks.

:func:`make_family` writes a base model and fine-tunes of it as Hugging Face
folders (Llama layout and config.json, sharded safetensors with an index, a
tokenizer stub), tensor by tensor so that billion-parameter families fit in
little memory. A fine-tune is ``base + delta`` with a delta that looks like
fine-tuning's: small, heavy-tailed (a few large entries, which magnitude
trimming is about), and with its sign agreeing between fine-tunes more often
than not (which sign election is about).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .io import PlannedTensor, ShardPlan, tensor_bytes


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int

    @property
    def params(self) -> int:
        per_layer = 4 * self.hidden**2 + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    def tensors(self) -> list[tuple[str, tuple]]:
        h, i = self.hidden, self.intermediate
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            out += [(p + "input_layernorm.weight", (h,)),
                    (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                    (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.gate_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def config(self, dtype: torch.dtype) -> dict:
        heads = max(1, self.hidden // 64)
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": heads,
                "num_key_value_heads": heads, "vocab_size": self.vocab,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False, "hidden_act": "silu",
                "torch_dtype": str(dtype).replace("torch.", "")}


def shape_for(params: int) -> Shape:
    """A Llama-like shape with about ``params`` parameters."""
    for hidden in (64, 128, 256, 512, 1024, 2048, 4096):
        vocab = 32000 if hidden >= 1024 else 8 * hidden
        shape = Shape(hidden, (hidden * 8 // 3 + 63) // 64 * 64, 1, vocab)
        per_layer = shape.params - Shape(hidden, shape.intermediate, 0, vocab).params
        layers = max(2, round((params - 2 * vocab * hidden) / per_layer))
        if layers <= 32 or hidden == 4096:
            return Shape(hidden, shape.intermediate, layers, vocab)
    raise AssertionError("unreachable")


def _side_files(folder: str, shape: Shape, dtype: torch.dtype) -> None:
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(shape.config(dtype), handle, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as handle:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, handle)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
        json.dump({"model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"}, handle)
    with open(os.path.join(folder, "tokenizer.json"), "w") as handle:
        json.dump({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"<unk>": 0},
                                               "unk_token": "<unk>"}}, handle)


def _generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((hash_name(name) + 1_000_003 * seed) % (2**63))
    return g


def hash_name(name: str) -> int:
    value = 0
    for ch in name.encode():
        value = (value * 131 + ch) % (2**61 - 1)
    return value


def base_tensor(name: str, shape: tuple, seed: int = 0) -> torch.Tensor:
    g = _generator(seed, name)
    if len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * 0.02


def delta_tensor(name: str, shape: tuple, model: int, seed: int = 0, scale: float = 1e-3) -> torch.Tensor:
    """A fine-tuning-like delta: shared direction + own noise, with heavy tails."""
    delta = torch.randn(shape, generator=_generator(seed + 7919, name)).mul_(0.6)
    delta.add_(torch.randn(shape, generator=_generator(seed + 104729 * (model + 1), name)))
    return delta.mul_(delta.abs().sqrt_().mul_(scale))  # heavier tails than a Gaussian


def make_family(root: str, params: int = 200_000, n_finetunes: int = 3,
                dtype: torch.dtype = torch.float32, shard_size: int = 2 * 1024**3,
                seed: int = 0, shape: Shape | None = None) -> list[str]:
    """Write ``root/base`` and ``root/ft1..ftN``; returns their paths (base first).

    All models are written in one pass (each base tensor is generated once).
    """
    shape = shape or shape_for(params)
    paths = [os.path.join(root, "base")] + [os.path.join(root, f"ft{i + 1}") for i in range(n_finetunes)]
    plan = ShardPlan([PlannedTensor(n, s, dtype) for n, s in shape.tensors()], shard_size)
    handles = []
    for path in paths:
        os.makedirs(path, exist_ok=True)
    for shard in plan.shards:
        handles = [open(os.path.join(path, shard.file), "wb") for path in paths]
        try:
            for handle in handles:
                handle.write(shard.header_bytes())
            for planned in shard.tensors:
                base = base_tensor(planned.name, planned.shape, seed)
                handles[0].write(tensor_bytes(base.to(dtype)))
                for m, handle in enumerate(handles[1:]):
                    tuned = base + delta_tensor(planned.name, planned.shape, m, seed)
                    handle.write(tensor_bytes(tuned.to(dtype)))
        finally:
            for handle in handles:
                handle.close()
    for path in paths:
        plan.write_index(path)
        _side_files(path, shape, dtype)
    return paths
