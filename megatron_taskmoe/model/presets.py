"""Named model presets: sizes and the papers' systems, as functions derived from each other.

Sizes:
  paper_base        Pham et al. 2023 (4.2): 12+12 layers, d 1024, FFN 4096, 16 heads, dropout 0.3
  transformer_base  Kudugunta et al. 2021 (4.1): Transformer-Base, 6+6 layers, d 512, FFN 2048, 8 heads, dropout 0.1
  tiny              CPU tests: d 32, FFN 64, 4 heads, 2+2 layers, no dropout

Systems take a size (default `paper_base()`) and set the MoE part. Pham et al.'s replace EVERY FFN by an MoE layer of
8 experts (section 4.2.1), top-2 gates, GShard load balancing; task embeddings of 64 and adapters of 256 (section
4.2). Their rows:

  dense                      Tables 2 and 3 "Dense": no MoE layer
  moe_token                  Table 2 "MoE Token": a token gate per MoE layer
  moe_sentence               Table 2 "MoE Sentence": a sentence's tokens follow its mean representation (the
                             decoder routes by its source sentence, see routing.py)
  moe_task_static            Table 3 "MoE + Task Static": a task-aware MoE gate (concat(token, task embedding)) and
                             one adapter per task on top of each MoE layer
  moe_task_dynamic           Table 3 "MoE + Task Dynamic": the same gate, ceil(log2 G) shared adapters picked by a
                             task gate over concat(token, task embedding)
  moe_task_shared_dynamic    Table 2 "Task-MoE (shared-dynamic)", Table 3 "MoE + Task Shared-Dynamic": as
                             dynamic, the task gate and the MoE gate share one task embedding per layer
  dense_task_static          Table 3 "Dense + Task Static": no experts (each MoE layer one FFN, no load-balancing
  dense_task_dynamic         loss) with static / dynamic adapters on top of every FFN
  moe_token_adapters_static  not a paper row: a task-agnostic token gate with static / dynamic adapters on top (an
  moe_token_adapters_dynamic ablation separating the adapters from the task-aware gate)

Kudugunta et al.'s replace the FFN of ALTERNATE layers by an MoE layer of 32 experts (section 4.1), at
`transformer_base` size; routing is chosen per side (Table 1, "Routing Granularity: Encoder / Decoder"):

  kudugunta_token            Token / Token ("Token-level MoE - 32 experts")
  kudugunta_pair             Language Pair / Language Pair ("Task-level MoE")
  kudugunta_target           Target / Target ("Task-level MoE"), every MoE layer by target language
  token_enc_pair_dec         Token / Language Pair
  token_enc_task_dec         Token / Target: the paper's best, and what the `extract_task` tool serves best

At the `tiny` size every system has 4 experts and adapters/task embeddings of 32/8 (CPU-test scale).
`get(name, size="paper_base", **overrides)` builds any of them by name; `PRESETS` lists the names.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from megatron_taskmoe.model.config import ModelConfig
from megatron_taskmoe.model.moe_config import AdapterConfig, MoEConfig, RoutingConfig

# The papers' corpora use sentencepiece vocabularies of this order; real runs pass the tokenizer's size.
DEFAULT_VOCAB_SIZE = 32000


def paper_base(**overrides) -> ModelConfig:
    """Pham et al. 2023's Transformer: 12+12 layers, d 1024, FFN 4096, 16 heads, dropout 0.3 (dense)."""
    fields = dict(
        vocab_size=DEFAULT_VOCAB_SIZE,
        hidden_size=1024,
        ffn_hidden_size=4096,
        num_attention_heads=16,
        encoder_layers=12,
        decoder_layers=12,
        dropout=0.3,
        attention_dropout=0.1,
        max_source_positions=256,
        max_target_positions=256,
        label_smoothing=0.1,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def transformer_base(**overrides) -> ModelConfig:
    """Kudugunta et al. 2021's Transformer-Base (Vaswani et al.): 6+6 layers, d 512, FFN 2048, 8 heads, dropout
    0.1."""
    fields = dict(hidden_size=512, ffn_hidden_size=2048, num_attention_heads=8, encoder_layers=6, decoder_layers=6,
                  dropout=0.1, attention_dropout=0.1)
    fields.update(overrides)
    return paper_base(**fields)


def tiny(**overrides) -> ModelConfig:
    """CPU-test size: d 32, FFN 64, 4 heads, 2+2 layers, no dropout (so parallel layouts compare exactly)."""
    fields = dict(
        vocab_size=256,
        vocab_pad_multiple=8,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        encoder_layers=2,
        decoder_layers=2,
        dropout=0.0,
        attention_dropout=0.0,
        max_source_positions=64,
        max_target_positions=64,
        label_smoothing=0.1,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


SIZES: dict[str, Callable[..., ModelConfig]] = {"paper_base": paper_base, "transformer_base": transformer_base,
                                                "tiny": tiny}


def _size(base: Optional[ModelConfig]) -> ModelConfig:
    return paper_base() if base is None else base


def _small(base: ModelConfig) -> bool:
    """CPU-test scale (the `tiny` size and others as narrow)."""
    return base.hidden_size <= 64


def _with_moe(base: Optional[ModelConfig], moe: MoEConfig) -> ModelConfig:
    base = _size(base)
    if base.moe is not None:
        moe = replace(moe, num_tasks=base.moe.num_tasks, num_languages=base.moe.num_languages)
    return replace(base, moe=moe, bias=False)


def _routed(base: Optional[ModelConfig], *, experts: int, layer_freq: int, encoder: str, decoder: str,
            encoder_source: str = "task", decoder_source: str = "task", adapters: Optional[AdapterConfig] = None,
            task_embed_dim: int = 64) -> ModelConfig:
    """An MoE system: top-2 of `experts` (4 at CPU-test scale) on every `layer_freq`-th FFN, GShard loss 0.01."""
    base = _size(base)
    small = _small(base)
    embed = 8 if small else task_embed_dim
    return _with_moe(base, MoEConfig(
        num_experts=4 if small else experts,
        topk=2,
        aux_loss_coeff=1e-2,
        encoder=RoutingConfig(mode=encoder, task_source=encoder_source, layer_freq=layer_freq, task_embed_dim=embed),
        decoder=RoutingConfig(mode=decoder, task_source=decoder_source, layer_freq=layer_freq, task_embed_dim=embed),
        adapters=adapters or AdapterConfig(),
    ))


def _adapters(base: Optional[ModelConfig], mode: str) -> AdapterConfig:
    """Pham et al.'s adapters: task embedding 64, bottleneck 256 (8 and 32 at CPU-test scale)."""
    small = _small(_size(base))
    return AdapterConfig(mode=mode, task_embed_dim=8 if small else 64, hidden_size=32 if small else 256)


# ------------------------------------------------------------------------------------- Pham et al. 2023


def _pham(base: Optional[ModelConfig], routing: str, adapters: str = "none") -> ModelConfig:
    return _routed(base, experts=8, layer_freq=1, encoder=routing, decoder=routing,
                   adapters=_adapters(base, adapters))


def dense(base: Optional[ModelConfig] = None) -> ModelConfig:
    return replace(_size(base), moe=None)


def moe_token(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _pham(base, "token")


def moe_sentence(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _pham(base, "sentence")


def moe_task_static(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _pham(base, "task_token", "static")


def moe_task_dynamic(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _pham(base, "task_token", "dynamic")


def moe_task_shared_dynamic(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _pham(base, "task_token", "shared_dynamic")


def moe_token_adapters_static(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _pham(base, "token", "static")


def moe_token_adapters_dynamic(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _pham(base, "token", "dynamic")


def _without_experts(cfg: ModelConfig) -> ModelConfig:
    """One expert, top-1, no load-balancing loss: the MoE layers become plain FFNs that keep their adapters."""
    return replace(cfg, moe=replace(cfg.moe, num_experts=1, topk=1, aux_loss_coeff=0.0, z_loss_coeff=0.0))


def dense_task_static(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _without_experts(moe_token_adapters_static(base))


def dense_task_dynamic(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _without_experts(moe_token_adapters_dynamic(base))


# ------------------------------------------------------------------------------------- Kudugunta et al. 2021


def _kudugunta(base: Optional[ModelConfig], encoder: str, decoder: str) -> ModelConfig:
    """Routing per side: "token", "pair" (task routing by language pair) or "target" (by target language)."""
    def mode(granularity: str) -> tuple[str, str]:
        return {"token": ("token", "task"), "pair": ("task", "task"), "target": ("task", "target_language")}[
            granularity]

    (enc_mode, enc_source), (dec_mode, dec_source) = mode(encoder), mode(decoder)
    return _routed(base, experts=32, layer_freq=2, encoder=enc_mode, decoder=dec_mode, encoder_source=enc_source,
                   decoder_source=dec_source)


def kudugunta_token(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _kudugunta(base, "token", "token")


def kudugunta_pair(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _kudugunta(base, "pair", "pair")


def kudugunta_target(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _kudugunta(base, "target", "target")


def token_enc_pair_dec(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _kudugunta(base, "token", "pair")


def token_enc_task_dec(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _kudugunta(base, "token", "target")


SYSTEMS: dict[str, Callable[[Optional[ModelConfig]], ModelConfig]] = {
    "dense": dense,
    "moe_token": moe_token,
    "moe_sentence": moe_sentence,
    "moe_task_static": moe_task_static,
    "moe_task_dynamic": moe_task_dynamic,
    "moe_task_shared_dynamic": moe_task_shared_dynamic,
    "dense_task_static": dense_task_static,
    "dense_task_dynamic": dense_task_dynamic,
    "moe_token_adapters_static": moe_token_adapters_static,
    "moe_token_adapters_dynamic": moe_token_adapters_dynamic,
    "kudugunta_token": kudugunta_token,
    "kudugunta_pair": kudugunta_pair,
    "kudugunta_target": kudugunta_target,
    "token_enc_pair_dec": token_enc_pair_dec,
    "token_enc_task_dec": token_enc_task_dec,
}

PRESETS = tuple(SIZES) + tuple(SYSTEMS)


def get(
    name: str, size: str = "paper_base", *, num_tasks: int = 1, num_languages: int = 1, **overrides
) -> ModelConfig:
    """Preset `name` (a system or a size) at `size`, with the task/language counts of the corpus and any
    `ModelConfig` field overrides (e.g. vocab_size=...)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(SIZES)}")
    if name in SIZES:
        cfg = SIZES[name](**overrides)
    elif name in SYSTEMS:
        cfg = SYSTEMS[name](SIZES[size](**overrides))
    else:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    if cfg.moe is not None:
        cfg = replace(cfg, moe=replace(cfg.moe, num_tasks=num_tasks, num_languages=num_languages))
    return cfg
