"""The exported model's `config.json`: architecture, routing, task map, languages and special ids, as plain data.

An export directory (`checkpoint_tools/export.py`) holds `model.safetensors`, `config.json` and `tokenizer.model`.
This module reads and validates `config.json` without anything from megatron-core or the trainer: the reference
model must load where neither is installed. Everything the trainer derives from its own config (which layers are
MoE, how many dynamic adapters, whether top-2 weights are renormalized) is resolved at export time and written
explicitly, so the reader needs no preset logic.

Legend: E experts, G task-table rows, C task embedding dim, A adapters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

FORMAT = "megatron-taskmoe/reference"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 1 has no `model.embedding_scale` (its models used 1.0)."""
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"

ROUTING_MODES = ("token", "sentence", "task", "task_token")
TASK_SOURCES = ("task", "target_language")
ADAPTER_MODES = ("none", "static", "dynamic", "shared_dynamic")


class ExportFormatError(ValueError):
    """An export directory that cannot be read; the message names the file and the field."""


@dataclass(kw_only=True)
class RoutingSpec:
    """One side's MoE layers: which layers, how many experts, how the router computes its logits."""

    mode: str = "token"
    """"token", "sentence", "task" or "task_token" (as RoutingConfig.mode)."""
    task_source: str = "task"
    """Which id indexes the task table ("task" or "target_language") in the task / task_token modes."""
    task_embed_dim: int = 0
    """Width of the task embedding of the "task" / "task_token" gates."""
    moe_layers: list[int] = field(default_factory=list)
    """0-based indexes of this side's layers whose FFN is an MoE layer."""
    num_experts: int = 0
    """Experts in this side's MoE layers."""
    capacity_num_experts: Optional[int] = None
    """E in the capacity formula when it is not num_experts (a sub-network extracted from a larger model)."""


@dataclass(kw_only=True)
class AdapterSpec:
    mode: str = "none"
    """"none", "static", "dynamic" or "shared_dynamic" (as AdapterConfig.mode)."""
    task_source: str = "task"
    """Which id indexes the adapters / task table ("task" or "target_language")."""
    task_embed_dim: int = 0
    """Width of the task embedding the adapter gate sees."""
    hidden_size: int = 0
    """Bottleneck width of every adapter."""
    num_adapters: int = 0
    """A: one per task row (static) or the resolved number of shared adapters (dynamic modes)."""
    topk: int = 1
    """Adapters each token uses in the dynamic modes."""


@dataclass(kw_only=True)
class MoESpec:
    topk: int
    """Experts each token goes to."""
    renormalize: bool
    """Top-k weights = softmax over the k selected logits (GShard top-2) instead of the raw softmax probabilities."""
    capacity_factor: Optional[float]
    """The capacity factor at inference (the trained model's outside training). None: no token is dropped; else an
    expert keeps ceil(tokens * topk / E * factor) tokens of a batch."""
    drop_policy: str
    """Which tokens an expert over capacity keeps: "probs" the highest routing probabilities, "position" the earliest.
    """
    pad_to_capacity: bool
    """Every expert's input padded to its capacity when dropping tokens."""
    router_fp32: bool
    """Router logits in fp32; False computes them in the input's dtype."""
    expert_ffn_hidden_size: int
    """Inner width of every expert FFN."""
    num_tasks: int
    """Number of tasks (rows of the task tables indexed by task)."""
    num_languages: int
    """Number of languages (rows of the tables indexed by language)."""
    encoder: RoutingSpec
    """The encoder's MoE layers."""
    decoder: RoutingSpec
    """The decoder's MoE layers."""
    adapters: AdapterSpec
    """Task adapters of both sides."""

    def side(self, side: str) -> RoutingSpec:
        return self.encoder if side == "encoder" else self.decoder

    def num_task_rows(self, task_source: str) -> int:
        return self.num_tasks if task_source == "task" else self.num_languages


@dataclass(kw_only=True)
class ArchConfig:
    """The encoder-decoder Transformer (pre-norm, shared source/target/output embeddings, learned positions)."""

    vocab_size: int
    """Rows of the embedding and the output layer."""
    hidden_size: int
    """Model width D."""
    ffn_hidden_size: int
    """Inner width of the dense FFNs."""
    num_attention_heads: int
    """Attention heads of every attention."""
    encoder_layers: int
    """Number of encoder layers."""
    decoder_layers: int
    """Number of decoder layers."""
    max_source_positions: int
    """Longest source sequence in tokens."""
    max_target_positions: int
    """Longest target sequence in tokens."""
    activation: str
    """"relu", "gelu" or "swiglu"."""
    normalization: str
    """"LayerNorm" or "RMSNorm"."""
    layernorm_epsilon: float
    """Epsilon of the norms."""
    bias: bool
    """Biases in the attention and FFN linears."""
    embedding_scale: float = 1.0
    """Token embeddings are multiplied by this before positions are added (sqrt(hidden_size) or 1)."""
    moe: Optional[MoESpec] = None
    """None: a dense model; otherwise its MoE layers and adapters."""

    @property
    def max_positions(self) -> int:
        return max(self.max_source_positions, self.max_target_positions)

    def moe_layers(self, side: str) -> list[int]:
        return [] if self.moe is None else list(self.moe.side(side).moe_layers)


@dataclass(kw_only=True)
class ExportConfig:
    """The whole `config.json`."""

    model: ArchConfig
    """The architecture."""
    task_map: dict
    """{"mode", "tasks": [names in id order], "direction_to_task": {"de-en": id, ...}}."""
    languages: list[str]
    """Sorted language codes; a language's id is its index."""
    language_tags: dict[str, int]
    """Piece id of each language's `<2xx>` tag, prepended to the source."""
    special_ids: dict[str, int]
    """pad, unk, bos, eos."""
    dtype: str
    """Dtype the tensors are stored in."""
    tokenizer_sha256: str
    """sha256 of the exported sentencepiece model file."""
    source: dict = field(default_factory=dict)
    """Where the export came from: checkpoint, step, parallel layout, ..."""
    format: str = FORMAT
    """The format's name; a reader checks it."""
    format_version: int = FORMAT_VERSION
    """The format's version."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def direction(self, src_lang: str, tgt_lang: str) -> dict[str, int]:
        """Ids of a trained direction (task id, language ids, target tag); ValueError naming the known ones."""
        name = f"{src_lang}-{tgt_lang}"
        known = self.task_map.get("direction_to_task", {})
        if name not in known:
            raise ValueError(f"direction {name} was not trained (the export has {', '.join(sorted(known)) or 'none'})")
        return {"task_id": int(known[name]), "src_lang_id": self.languages.index(src_lang),
                "tgt_lang_id": self.languages.index(tgt_lang), "tag_id": int(self.language_tags[tgt_lang])}


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ExportFormatError(f"{where}: expected an object, got {type(data).__name__}")
    names = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ExportFormatError(f"{where}: unknown field(s) {unknown}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ExportFormatError(f"{where}: {e}") from None


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ExportFormatError(f"{where}: {message}")


def parse_config(data: dict, where: str = CONFIG_FILE) -> ExportConfig:
    """`config.json`'s contents -> ExportConfig, with every field the reference model relies on checked."""
    _check(isinstance(data, dict), where, "not a JSON object")
    _check(data.get("format") == FORMAT, where, f"format {data.get('format')!r}, expected {FORMAT!r}")
    _check(data.get("format_version") in READABLE_VERSIONS, where,
           f"format_version {data.get('format_version')!r}, this reader knows {list(READABLE_VERSIONS)}")
    model = dict(data.get("model") or {})
    moe = model.pop("moe", None)
    if moe is not None:
        moe = dict(moe)
        for side in ("encoder", "decoder"):
            moe[side] = _build(RoutingSpec, moe.get(side), f"{where}: model.moe.{side}")
            spec = moe[side]
            _check(spec.mode in ROUTING_MODES, where, f"model.moe.{side}.mode={spec.mode!r} not in {ROUTING_MODES}")
            _check(spec.task_source in TASK_SOURCES, where, f"model.moe.{side}.task_source={spec.task_source!r}")
            _check(not spec.moe_layers or spec.num_experts >= 1, where, f"model.moe.{side}.num_experts must be >= 1")
            _check(spec.capacity_num_experts is None or (isinstance(spec.capacity_num_experts, int)
                                                         and spec.capacity_num_experts >= 1),
                   where, f"model.moe.{side}.capacity_num_experts must be null or >= 1")
        moe["adapters"] = _build(AdapterSpec, moe.get("adapters"), f"{where}: model.moe.adapters")
        _check(moe["adapters"].mode in ADAPTER_MODES, where, f"model.moe.adapters.mode={moe['adapters'].mode!r}")
        moe = _build(MoESpec, moe, f"{where}: model.moe")
        _check(moe.topk in (1, 2), where, f"model.moe.topk={moe.topk} must be 1 or 2")
        _check(moe.drop_policy in ("probs", "position"), where, f"model.moe.drop_policy={moe.drop_policy!r}")
    arch = _build(ArchConfig, {**model, "moe": moe}, f"{where}: model")
    _check(arch.activation in ("relu", "gelu", "swiglu"), where, f"model.activation={arch.activation!r}")
    _check(arch.normalization in ("LayerNorm", "RMSNorm"), where, f"model.normalization={arch.normalization!r}")
    _check(arch.hidden_size % arch.num_attention_heads == 0, where, "hidden_size not divisible by the heads")
    _check(isinstance(arch.embedding_scale, (int, float)) and arch.embedding_scale > 0, where,
           f"model.embedding_scale={arch.embedding_scale!r} must be a positive number")
    rest = {k: v for k, v in data.items() if k != "model"}
    cfg = _build(ExportConfig, {**rest, "model": arch}, where)
    _check(set(cfg.special_ids) >= {"pad", "unk", "bos", "eos"}, where, "special_ids needs pad, unk, bos, eos")
    _check(set(cfg.language_tags) >= set(cfg.languages), where, "language_tags lacks a language")
    return cfg


def read_config(directory: str | Path) -> ExportConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ExportFormatError(f"{path}: no such file (an export directory holds {CONFIG_FILE}, {WEIGHTS_FILE} "
                                f"and {TOKENIZER_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportFormatError(f"{path}: not readable JSON ({e})") from None
    return parse_config(data, str(path))
