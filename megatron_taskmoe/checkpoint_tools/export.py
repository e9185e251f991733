"""Export a checkpoint as a standalone inference directory for the pure-PyTorch reference model.

Output directory (written atomically: a `.partial.` sibling renamed when complete):
  * `model.safetensors`: the weights under the reference model's own names (`reference/model.py`), fp32 or
    bf16/fp16; no optimizer, no parallel layout, no megatron names;
  * `config.json`: architecture with everything the trainer derives resolved (MoE layer indexes, experts per side,
    adapters, top-k renormalization, capacity), the task map, languages, `<2xx>` tag ids, special ids, the
    tokenizer's sha256, the format and its version, and where it came from (`reference/config.py`);
  * `tokenizer.model`: the sentencepiece model the checkpoint was trained with.

The weights are renamed and re-laid-out from the single-process `EncoderDecoderModel` names of a `FullCheckpoint`
(any trainer layout, or a single .safetensors file, through `reading.read_checkpoint`): megatron's fused QKV (per head
[q, k, v] rows) and cross-attention KV (per head [k, v]) are split into q/k/v projections, experts are stacked,
the embedding's vocabulary padding rows are dropped (the output projection is the same tied table). Every tensor of
the checkpoint must be consumed by exactly one reference tensor, so an architecture the reference does not know
fails here instead of exporting something that computes another function.

`verify_export` runs the megatron model and the exported reference model on `verify.fixed_batch` (ragged padding,
every task) and compares logits, greedy and beam-4 outputs; for a bf16/fp16 export the megatron model gets the
same rounded weights, so the figure measures the implementation, not the rounding.

Legend: H heads, Dh head dim, D model dim, V vocabulary (Vp padded), E experts, F FFN dim.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from megatron_taskmoe.checkpoint.format import MARKER, TOKENIZER_FILE
from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError, FullCheckpoint
from megatron_taskmoe.checkpoint_tools.models import model_from_full
from megatron_taskmoe.checkpoint_tools.outputs import atomic_dir, check_output
from megatron_taskmoe.checkpoint_tools.reading import read_checkpoint
from megatron_taskmoe.checkpoint_tools.verify import fixed_batch, model_logits
from megatron_taskmoe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, lang_tag
from megatron_taskmoe.generation import beam_search
from megatron_taskmoe.model.config import TORCH_DTYPES, ModelConfig
from megatron_taskmoe.model.decoding import ModelDecoder
from megatron_taskmoe.reference import config as rc
from megatron_taskmoe.reference.model import ReferenceDecoder, ReferenceModel
from megatron_taskmoe.reference.translator import load

log = logging.getLogger(__name__)



class ExportVerificationError(RuntimeError):
    """The exported model does not reproduce the checkpoint's outputs (nothing was written)."""


# ------------------------------------------------------------------------------------------------ config
def _side_experts(cfg: ModelConfig, side: str) -> int:
    moe = cfg.moe
    return moe.side_num_experts(side) if hasattr(moe, "side_num_experts") else moe.num_experts


def arch_config(cfg: ModelConfig) -> rc.ArchConfig:
    """The reference architecture of a trainer `ModelConfig`, with every derived quantity resolved."""
    moe = None
    if cfg.moe is not None:
        m = cfg.moe
        sides = {}
        for side in ("encoder", "decoder"):
            r = m.side(side)
            sides[side] = rc.RoutingSpec(mode=r.mode, task_source=r.task_source, task_embed_dim=r.task_embed_dim,
                                         moe_layers=[i for i, p in enumerate(cfg.moe_pattern(side)) if p],
                                         num_experts=_side_experts(cfg, side),
                                         capacity_num_experts=r.capacity_num_experts)
        a = m.adapters
        rows = m.num_task_rows(a.task_source)
        num_adapters = {"none": 0, "static": rows}.get(a.mode) if not a.is_dynamic else a.resolved_num_adapters(rows)
        moe = rc.MoESpec(
            topk=m.topk, renormalize=m.topk > 1 and m.renormalize_topk, capacity_factor=m.inference_capacity_factor(),
            drop_policy=m.drop_policy, pad_to_capacity=m.pad_to_capacity, router_fp32=m.router_dtype == "fp32",
            expert_ffn_hidden_size=m.expert_ffn_hidden_size or cfg.ffn_hidden_size, num_tasks=m.num_tasks,
            num_languages=m.num_languages, encoder=sides["encoder"], decoder=sides["decoder"],
            adapters=rc.AdapterSpec(mode=a.mode, task_source=a.task_source, task_embed_dim=a.task_embed_dim,
                                    hidden_size=a.hidden_size, num_adapters=num_adapters,
                                    topk=1 if a.mode == "static" else a.topk))
    return rc.ArchConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers, max_source_positions=cfg.max_source_positions,
        max_target_positions=cfg.max_target_positions, activation=cfg.activation, normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon, bias=cfg.bias, embedding_scale=cfg.embedding_scale, moe=moe)


def language_tags(tokenizer_path: Path, languages: list[str]) -> dict[str, int]:
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(tokenizer_path))
    except (OSError, RuntimeError) as e:
        raise CheckpointToolError(f"{tokenizer_path}: the checkpoint's tokenizer is not a sentencepiece model "
                                  f"({e})") from None
    tags = {}
    for lang in languages:
        piece_id = sp.piece_to_id(lang_tag(lang))
        if piece_id == UNK_ID or sp.id_to_piece(piece_id) != lang_tag(lang):
            raise CheckpointToolError(f"{tokenizer_path}: no language tag {lang_tag(lang)} for language {lang}")
        tags[lang] = piece_id
    return tags


def export_config(ckpt: FullCheckpoint, tags: dict[str, int], dtype: str, tokenizer_sha256: str) -> rc.ExportConfig:
    meta = ckpt.meta
    for key in ("task_map", "languages"):
        if key not in meta:
            raise CheckpointToolError(f"{ckpt.source}: no {key!r} in the checkpoint record (not written by "
                                      "pretrain_mt.py)")
    return rc.ExportConfig(
        model=arch_config(ckpt.model_config()), task_map=copy.deepcopy(meta["task_map"]),
        languages=list(meta["languages"]), language_tags=tags,
        special_ids={"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}, dtype=dtype,
        tokenizer_sha256=tokenizer_sha256,
        source={"checkpoint": ckpt.source, "step": meta.get("step"), "parallel": meta.get("parallel"),
                "model_config": meta.get("model_config")})


# ------------------------------------------------------------------------------------------------ weights
def _split_heads(weight: torch.Tensor, heads: int, parts: int, name: str) -> list[torch.Tensor]:
    """megatron's per-head interleaved rows [H * parts * Dh, ...] -> `parts` tensors [H * Dh, ...]."""
    if weight.shape[0] % (heads * parts):
        raise CheckpointToolError(f"{name}: {weight.shape[0]} rows do not split into {heads} heads x {parts} "
                                  "(grouped-query attention is not supported by the reference model)")
    head_dim = weight.shape[0] // (heads * parts)
    grouped = weight.reshape(heads, parts, head_dim, *weight.shape[1:])
    return [grouped[:, p].reshape(heads * head_dim, *weight.shape[1:]).contiguous() for p in range(parts)]


_RENAMES = [  # megatron suffix (inside a layer) -> reference suffix
    ("input_layernorm.", "self_attn_norm."),
    ("self_attention.linear_proj.", "self_attn.out_proj."),
    ("pre_cross_attn_layernorm.", "cross_attn_norm."),
    ("cross_attention.linear_q.", "cross_attn.q_proj."),
    ("cross_attention.linear_proj.", "cross_attn.out_proj."),
    ("pre_mlp_layernorm.", "ffn_norm."),
    ("mlp.linear_fc1.", "ffn.fc1."),
    ("mlp.linear_fc2.", "ffn.fc2."),
    ("mlp.router.weight", "ffn.router.weight"),
    ("mlp.router.task_embedding", "ffn.router.task_embedding"),
    ("mlp.adapters.ln_weight_AD", "ffn.adapters.norm_weight"),
    ("mlp.adapters.ln_bias_AD", "ffn.adapters.norm_bias"),
    ("mlp.adapters.down_ADH", "ffn.adapters.down_weight"),
    ("mlp.adapters.down_bias_AH", "ffn.adapters.down_bias"),
    ("mlp.adapters.up_AHD", "ffn.adapters.up_weight"),
    ("mlp.adapters.up_bias_AD", "ffn.adapters.up_bias"),
    ("mlp.adapters.gate_weight", "ffn.adapters.gate_weight"),
    ("mlp.adapters.task_embedding", "ffn.adapters.task_embedding"),
]
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")


def reference_state(ckpt: FullCheckpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the reference model's names (fp32/bf16 as stored; see the module docstring).

    Every source tensor is used exactly once; anything left over is an error naming it."""
    cfg = ckpt.model_config()
    heads = cfg.num_attention_heads
    src = {k: v for k, v in ckpt.state.items() if not k.endswith("_extra_state")}
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, int, int], dict[int, torch.Tensor]] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return src[name]

    word = take("embedding.word_embeddings.weight") if "embedding.word_embeddings.weight" in src else None
    if word is None:
        raise CheckpointToolError(f"{ckpt.source}: no embedding.word_embeddings.weight")
    if word.shape[0] < cfg.vocab_size:
        raise CheckpointToolError(f"{ckpt.source}: the embedding has {word.shape[0]} rows, fewer than the "
                                  f"vocabulary of {cfg.vocab_size}")
    out["embed_tokens.weight"] = word[: cfg.vocab_size].clone()
    if "output_layer.weight" in src and not torch.equal(take("output_layer.weight"), word):
        raise CheckpointToolError(f"{ckpt.source}: output_layer.weight differs from the word embedding (the "
                                  "reference model ties them)")
    if "embedding.position_embeddings.weight" in src:
        out["embed_positions.weight"] = take("embedding.position_embeddings.weight")
    for side in ("encoder", "decoder"):
        for p in ("weight", "bias"):
            name = f"{side}.final_layernorm.{p}"
            if name in src:
                out[f"{side}.final_norm.{p}"] = take(name)

    for name in sorted(src):
        match = _LAYER.match(name)
        if not match or name in used:
            continue
        side, index, rest = match.group(1), int(match.group(2)), match.group(3)
        head = f"{side}.layers.{index}."
        expert = _EXPERT.match(rest)
        if expert:
            experts.setdefault((side, index, int(expert.group(2))), {})[int(expert.group(1))] = take(name)
            continue
        if rest.startswith("self_attention.linear_qkv."):
            kind = rest.rsplit(".", 1)[1]
            for proj, tensor in zip(("q_proj", "k_proj", "v_proj"), _split_heads(take(name), heads, 3, name)):
                out[f"{head}self_attn.{proj}.{kind}"] = tensor
            continue
        if rest.startswith("cross_attention.linear_kv."):
            kind = rest.rsplit(".", 1)[1]
            for proj, tensor in zip(("k_proj", "v_proj"), _split_heads(take(name), heads, 2, name)):
                out[f"{head}cross_attn.{proj}.{kind}"] = tensor
            continue
        for old, new in _RENAMES:
            if rest.startswith(old):
                out[head + new + rest[len(old):]] = take(name)
                break
    for (side, index, fc), by_expert in sorted(experts.items()):
        if sorted(by_expert) != list(range(len(by_expert))):
            raise CheckpointToolError(f"{ckpt.source}: {side}.layers.{index} has experts {sorted(by_expert)}, "
                                      "expected 0..E-1")
        out[f"{side}.layers.{index}.ffn.experts.fc{fc}_weight"] = torch.stack(
            [by_expert[e] for e in range(len(by_expert))])
    left = sorted(set(src) - used)
    if left:
        raise CheckpointToolError(f"{ckpt.source}: {len(left)} tensor(s) the reference model has no place for, "
                                  f"e.g. {left[:3]}")
    return out


def check_against_model(state: dict[str, torch.Tensor], arch: rc.ArchConfig, where: str) -> None:
    """Names and shapes exactly those of `ReferenceModel(arch)` (so the export loads strictly)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ReferenceModel(arch).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {expected[k]}" for k in sorted(set(state) & set(expected))
             if tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointToolError(f"{where}: the weights do not fit the reference architecture: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}, shape mismatches {wrong[:3]}")


# ------------------------------------------------------------------------------------------------ export
def export_checkpoint(ckpt: FullCheckpoint, output: str | os.PathLike, *, dtype: str = "fp32",
                      overwrite: bool = False, verify: bool = False, tolerance: float = 1e-4) -> dict:
    """Write the export directory of `ckpt`; with `verify`, check it reproduces the checkpoint before the
    directory appears (`ExportVerificationError` otherwise, nothing written). Returns a summary dict."""
    if dtype not in TORCH_DTYPES:
        raise CheckpointToolError(f"--dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
    output = check_output(output, overwrite)
    if ckpt.tokenizer is None:
        raise CheckpointToolError(f"{ckpt.source}: the checkpoint carries no tokenizer ({TOKENIZER_FILE} beside "
                                  f"{MARKER}); the export needs it")
    sha = hashlib.sha256(ckpt.tokenizer).hexdigest()
    recorded = ckpt.meta.get("tokenizer_sha256")
    if recorded and recorded != sha:
        raise CheckpointToolError(f"{ckpt.source}: the tokenizer's sha256 {sha[:12]}... differs from the one the "
                                  f"model was trained with ({recorded[:12]}...)")
    state = reference_state(ckpt)
    summary = {"output": str(output), "dtype": dtype, "parameters": sum(t.numel() for t in state.values()),
               "tensors": len(state)}
    with atomic_dir(output, overwrite) as partial:
        (partial / rc.TOKENIZER_FILE).write_bytes(ckpt.tokenizer)
        tags = language_tags(partial / rc.TOKENIZER_FILE, list(ckpt.meta.get("languages", [])))
        config = export_config(ckpt, tags, dtype, sha)
        check_against_model(state, config.model, str(ckpt.source))
        (partial / rc.CONFIG_FILE).write_text(config.to_json() + "\n", encoding="utf-8")
        save_file({k: v.detach().to(TORCH_DTYPES[dtype]).contiguous() for k, v in state.items()},
                  str(partial / rc.WEIGHTS_FILE), metadata={"format": rc.FORMAT,
                                                            "format_version": str(rc.FORMAT_VERSION)})
        if verify:
            result = verify_export(ckpt, partial, dtype=dtype)
            summary.update(result)
            problems = []
            if not result["max_abs_logit_difference"] <= tolerance:
                problems.append(f"logits differ by {result['max_abs_logit_difference']:.3g} (> {tolerance:g})")
            if not (result["greedy_identical"] and result["beam_identical"]):
                problems.append("decoded outputs differ")
            if problems:
                raise ExportVerificationError(f"{output}: the exported model does not reproduce {ckpt.source}: "
                                              + "; ".join(problems) + " (nothing written)")
    log.info("exported %s -> %s (%d parameters, %s)", ckpt.source, output, summary["parameters"], dtype)
    return summary


def export(source: str | os.PathLike, output: str | os.PathLike, **kwargs) -> dict:
    """`export_checkpoint` of a trainer checkpoint (any layout; a checkpoint, checkpoints root or run directory)
    or a single .safetensors file written by convert.py."""
    check_output(output, kwargs.get("overwrite", False))
    return export_checkpoint(read_checkpoint(source), output, **kwargs)


# ------------------------------------------------------------------------------------------------ verification
@torch.no_grad()
def verify_export(ckpt: FullCheckpoint, directory: str | os.PathLike, *, dtype: str = "fp32",
                  max_len: int = 10) -> dict:
    """Megatron model (weights rounded through `dtype`) vs the exported reference model on `verify.fixed_batch`:
    the largest absolute logit difference at real target positions, and whether greedy and beam-4 searches over
    the batch's sources give the same token ids."""
    if dtype != "fp32":
        ckpt = FullCheckpoint(state={k: v.to(TORCH_DTYPES[dtype]).to(v.dtype) for k, v in ckpt.state.items()},
                              meta=ckpt.meta, tokenizer=ckpt.tokenizer, source=ckpt.source)
    megatron_model = model_from_full(ckpt)
    reference = load(directory).model
    batch = fixed_batch(ckpt.model_config())
    ours = model_logits(megatron_model, batch)
    ref = reference(batch["src_tokens"], batch["src_padding_mask"], batch["tgt_input"], batch["tgt_padding_mask"],
                    task_ids=batch["task_ids"], tgt_lang_ids=batch["tgt_lang_ids"])
    ref = ref.masked_fill(batch["tgt_padding_mask"].unsqueeze(-1), 0.0)
    diff = float((ours - ref).abs().max())
    ids = dict(task_ids=batch["task_ids"], tgt_lang_ids=batch["tgt_lang_ids"])
    m_state = megatron_model.encode(batch["src_tokens"], batch["src_padding_mask"], src_lang_ids=batch["src_lang_ids"],
                                    **ids)
    r_state = reference.encode(batch["src_tokens"], batch["src_padding_mask"], **ids)
    rows = batch["src_tokens"].shape[0]
    same = {}
    for name, beam in (("greedy", 1), ("beam", 4)):
        kw = dict(batch_size=rows, bos=BOS_ID, eos=EOS_ID, max_lengths=[max_len] * rows, beam_size=beam)
        same[name] = (beam_search(ModelDecoder(megatron_model, m_state, beam_size=beam, max_length=max_len + 1), **kw)
                      == beam_search(ReferenceDecoder(reference, r_state, beam), **kw))
    return {"max_abs_logit_difference": diff, "greedy_identical": same["greedy"], "beam_identical": same["beam"],
            "verify_batch": list(batch["src_tokens"].shape)}


__all__ = ["ExportVerificationError", "arch_config", "reference_state", "export_checkpoint", "export",
           "verify_export"]

