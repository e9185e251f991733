"""Named model presets: two sizes and the papers' systems, as functions derived from each other.

Sizes: `paper_base()` (Pham et al. 2023: 12+12 layers, d 1024, FFN 4096, 16 heads, dropout 0.3) and `tiny()` (CPU
tests). Systems take a size (default `paper_base()`) and set the MoE part:

  dense                    no MoE
  moe_token                token routing (GShard top-2, 8 experts, every other FFN, both sides)
  moe_sentence             sentence routing: a sentence's tokens follow its mean representation
  moe_task_static          token-routed MoE + one adapter per task (Pham et al. "static")
  moe_task_dynamic         token-routed MoE + ceil(log2 G) shared adapters picked by a task gate ("dynamic")
  moe_task_shared_dynamic  task-aware MoE gate sharing its task embeddings with the adapters' gate
  token_enc_task_dec       Kudugunta et al. 2021: token routing in the encoder, routing by target language in
                           the decoder
  dense_task_static        Pham et al.'s Table 3 "Dense + Task": no experts (one FFN where the MoE layers were,
  dense_task_dynamic       i.e. a single expert, no load-balancing loss) with static or dynamic task adapters

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


SIZES: dict[str, Callable[..., ModelConfig]] = {"paper_base": paper_base, "tiny": tiny}


def _size(base: Optional[ModelConfig]) -> ModelConfig:
    return paper_base() if base is None else base


def _with_moe(base: Optional[ModelConfig], moe: MoEConfig) -> ModelConfig:
    base = _size(base)
    if base.moe is not None:
        moe = replace(moe, num_tasks=base.moe.num_tasks, num_languages=base.moe.num_languages)
    return replace(base, moe=moe, bias=False)


def dense(base: Optional[ModelConfig] = None) -> ModelConfig:
    return replace(_size(base), moe=None)


def moe_token(base: Optional[ModelConfig] = None) -> ModelConfig:
    """GShard-style MoE: 8 experts (4 in `tiny`), top-2, every other FFN on both sides, load-balancing 0.01."""
    base = _size(base)
    experts = 4 if base.hidden_size <= 64 else 8
    return _with_moe(
        base,
        MoEConfig(
            num_experts=experts,
            topk=2,
            aux_loss_coeff=1e-2,
            encoder=RoutingConfig(mode="token", layer_freq=2),
            decoder=RoutingConfig(mode="token", layer_freq=2),
        ),
    )


def moe_sentence(base: Optional[ModelConfig] = None) -> ModelConfig:
    moe = moe_token(base).moe
    return _with_moe(
        base,
        replace(
            moe,
            encoder=replace(moe.encoder, mode="sentence"),
            decoder=replace(moe.decoder, mode="sentence"),
        ),
    )


def moe_task_static(base: Optional[ModelConfig] = None) -> ModelConfig:
    """Adapters as in the paper (task embedding 64, bottleneck 256); 8 and 32 at CPU-test sizes."""
    base = _size(base)
    small = base.hidden_size <= 64
    adapters = AdapterConfig(mode="static", task_embed_dim=8 if small else 64, hidden_size=32 if small else 256)
    return _with_moe(base, replace(moe_token(base).moe, adapters=adapters))


def moe_task_dynamic(base: Optional[ModelConfig] = None) -> ModelConfig:
    moe = moe_task_static(base).moe
    return _with_moe(base, replace(moe, adapters=replace(moe.adapters, mode="dynamic")))


def moe_task_shared_dynamic(base: Optional[ModelConfig] = None) -> ModelConfig:
    """The paper's best system: the MoE gate sees concat(token, task embedding) and shares that table with the
    dynamic adapters' task gate."""
    moe = moe_task_dynamic(base).moe
    embed = moe.adapters.task_embed_dim
    return _with_moe(
        base,
        replace(
            moe,
            encoder=replace(moe.encoder, mode="task_token", task_embed_dim=embed),
            decoder=replace(moe.decoder, mode="task_token", task_embed_dim=embed),
            adapters=replace(moe.adapters, mode="shared_dynamic"),
        ),
    )


def token_enc_task_dec(base: Optional[ModelConfig] = None) -> ModelConfig:
    """Kudugunta et al. 2021's best: token-routed encoder, decoder routed by target language."""
    moe = moe_token(base).moe
    return _with_moe(
        base, replace(moe, decoder=replace(moe.decoder, mode="task", task_source="target_language"))
    )


def _without_experts(cfg: ModelConfig) -> ModelConfig:
    """One expert, top-1, no load-balancing loss: the MoE layers become plain FFNs that keep their adapters."""
    return replace(cfg, moe=replace(cfg.moe, num_experts=1, topk=1, aux_loss_coeff=0.0, z_loss_coeff=0.0))


def dense_task_static(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _without_experts(moe_task_static(base))


def dense_task_dynamic(base: Optional[ModelConfig] = None) -> ModelConfig:
    return _without_experts(moe_task_dynamic(base))


SYSTEMS: dict[str, Callable[[Optional[ModelConfig]], ModelConfig]] = {
    "dense": dense,
    "moe_token": moe_token,
    "moe_sentence": moe_sentence,
    "moe_task_static": moe_task_static,
    "moe_task_dynamic": moe_task_dynamic,
    "moe_task_shared_dynamic": moe_task_shared_dynamic,
    "token_enc_task_dec": token_enc_task_dec,
    "dense_task_static": dense_task_static,
    "dense_task_dynamic": dense_task_dynamic,
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
