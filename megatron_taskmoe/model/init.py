"""The model's initial weights: one rule per kind of parameter, the same numbers under every parallel layout.

megatron-core initialises each module as it builds it, from the global RNG, so the numbers a parameter gets depend
on what the rank built before it: under expert parallelism a rank builds only its own experts, under pipeline
parallelism only its own layers, and the weights that follow differ from the single-process model's. Here every
parameter is drawn from its own generator, seeded by (seed, its name in the whole single-process model), over its
full unsharded shape, and each rank keeps its slice (megatron's tensor-parallel partition and stride). So a model
starts from the same weights whatever the layout, and the rules are written down in one place.

Rules by `ModelConfig.init_method`:

  parameter                                    "xavier_uniform" (fairseq)          "normal" (megatron's GPT)
  word and position embeddings                 N(0, d^-0.5)                        N(0, init_std)
  linear weights (attention, FFN, experts)     Xavier-uniform over the full matrix N(0, init_std)
  attention output and FFN fc2 (experts too)   Xavier-uniform                      N(0, init_std / sqrt(2 L))
  router gate, dynamic-adapter gate            Xavier-uniform                      N(0, init_std)
  adapter down-projections                     Xavier-uniform per adapter          N(0, init_std)
  adapter up-projections                       zero (a new adapter has no effect)  zero
  task embedding tables                        N(0, 1)                             N(0, 1)
  norm weights / every bias                    one / zero                          one / zero

The rows that pad the word-embedding table beyond the real vocabulary are zero (they are never looked up and are
masked out of the output softmax). A gated FFN's fc1 ([gate; up]) is two matrices, each initialised on its own.
L is the number of layers of both sides.

Legend: V vocabulary, Vp padded rows, D model dim, A adapters, H adapter width.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Callable

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_taskmoe.model.adapters import TaskAdapters
from megatron_taskmoe.model.config import ModelConfig
from megatron_taskmoe.model.norm import SequenceParallelNorm
from megatron_taskmoe.model.router import TaskTopKRouter

_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")
_OUTPUT_PROJECTIONS = ("linear_proj", "linear_fc2")


def parameter_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for parameter `name` (same on every rank and every run)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _xavier(full: torch.Tensor, generator: torch.Generator) -> None:
    torch.nn.init.xavier_uniform_(full, generator=generator)


class _Rules:
    """Fills a full (unsharded) tensor for a parameter kind, by `ModelConfig.init_method`."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.xavier = cfg.init_method == "xavier_uniform"
        self.output_std = cfg.init_std / math.sqrt(2.0 * cfg.num_layers)

    def embedding(self, full: torch.Tensor, g: torch.Generator) -> None:
        full.normal_(0.0, self.cfg.hidden_size ** -0.5 if self.xavier else self.cfg.init_std, generator=g)

    def matrix(self, full: torch.Tensor, g: torch.Generator, output: bool = False) -> None:
        if self.xavier:
            _xavier(full, g)
        else:
            full.normal_(0.0, self.output_std if output else self.cfg.init_std, generator=g)

    def gated_fc1(self, full: torch.Tensor, g: torch.Generator) -> None:
        for half in full.chunk(2, dim=0):
            self.matrix(half, g)


def _fill(rules: _Rules, owner: torch.nn.Module, attr: str, name: str, full: torch.Tensor,
          g: torch.Generator) -> None:
    """Initialise `full`, the whole-model tensor of parameter `name` (`owner.attr`)."""
    cfg = rules.cfg
    if name == "embedding.word_embeddings.weight":
        full.zero_()
        rules.embedding(full[: cfg.vocab_size], g)
    elif name == "embedding.position_embeddings.weight":
        rules.embedding(full, g)
    elif isinstance(owner, SequenceParallelNorm) or attr in ("ln_weight_AD", "ln_bias_AD"):
        full.fill_(1.0 if attr in ("weight", "ln_weight_AD") else 0.0)
    elif attr.startswith("bias") or attr.endswith("bias_AH") or attr.endswith("bias_AD"):
        full.zero_()
    elif isinstance(owner, (ColumnParallelLinear, RowParallelLinear)):
        if name.endswith("linear_fc1.weight") and owner.config.gated_linear_unit:
            rules.gated_fc1(full, g)
        else:
            rules.matrix(full, g, output=name.rsplit(".", 2)[-2] in _OUTPUT_PROJECTIONS)
    elif attr == "task_embedding":
        full.normal_(0.0, 1.0, generator=g)
    elif isinstance(owner, TaskTopKRouter) and attr == "weight":
        rules.matrix(full, g)
    elif isinstance(owner, TaskAdapters) and attr == "gate_weight":
        rules.matrix(full, g)
    elif isinstance(owner, TaskAdapters) and attr == "down_ADH":
        for down_DH in full:
            rules.matrix(down_DH, g)
    elif isinstance(owner, TaskAdapters) and attr == "up_AHD":
        full.zero_()
    else:
        raise ValueError(f"init: no initialisation rule for parameter {name} ({type(owner).__name__}.{attr})")


def _local_slice(param: torch.Tensor, full: torch.Tensor, owner: torch.nn.Module) -> torch.Tensor:
    """This rank's part of `full`, as megatron partitions `param` over its module's tensor-parallel group."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    group = owner.tp_group
    rank, size = group.rank(), group.size()
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = full.split(full.shape[dim] // (size * stride), dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def _full_shape(param: torch.Tensor, owner: torch.nn.Module) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= owner.tp_group.size()
    return shape


@torch.no_grad()
def initialize(model: torch.nn.Module, cfg: ModelConfig, seed: int,
               whole_model_name: Callable[[str], str]) -> int:
    """Give every parameter of `model` (a whole model or a pipeline stage) its initial value; returns how many.

    `whole_model_name(name)` maps a parameter's local name to its name in the single-process model (global layer
    and expert indexes, the tied output weight to the word embedding)."""
    rules = _Rules(cfg)
    count = 0
    for name, param in model.named_parameters():
        owner_name, attr = name.rsplit(".", 1) if "." in name else ("", name)
        owner = model.get_submodule(owner_name)
        key = whole_model_name(name)
        generator = torch.Generator().manual_seed(parameter_seed(seed, key))
        full = torch.empty(_full_shape(param, owner), dtype=torch.float32)
        _fill(rules, owner, attr, key, full, generator)
        param.copy_(_local_slice(param, full, owner).to(param.dtype))
        count += 1
    return count


def whole_model_namer(model: torch.nn.Module, layers: dict[str, list[int]]) -> Callable[[str], str]:
    """`initialize`'s name map for a model (or stage) holding `layers[side]` (global indexes) of each side."""

    def rename(name: str) -> str:
        if name == "output_layer.weight":  # a pipeline stage's copy of the tied word embedding
            return "embedding.word_embeddings.weight"
        match = _LAYER.match(name)
        if match is None:
            return name
        side, local = match.group(1), int(match.group(2))
        out = f"{side}.layers.{layers[side][local]}.{name[match.end():]}"
        expert = _LOCAL_EXPERT.search(name)
        if expert is not None:  # the MoE layer (name up to ".experts") knows its local experts' global indexes
            global_index = model.get_submodule(name[: expert.start()]).local_expert_indices[int(expert.group(1))]
            out = _LOCAL_EXPERT.sub(f".experts.local_experts.{global_index}.", out)
        return out

    return rename
