"""A dense model, or the dense sub-network of some directions of a task-routed MoE model, as a CTranslate2 model.

CTranslate2 has no Mixture-of-Experts; what it can serve is the dense Transformer that `serving/dense.py` makes of
a task-routed model for fixed directions (or a dense model as it is). The model is described with CTranslate2's own
specification classes (`ctranslate2.specs.TransformerSpec`, filled from the reference model's tensors) and written
by a `ctranslate2.converters.Converter` subclass, so the file format, the quantization (int8, int8_float32, int16,
float16, bfloat16) and the vocabulary files are CTranslate2's.

The mapping (reference names on the left, `reference/model.py`):
  * pre-norm layers with a final norm per side: `pre_norm=True`, `{side}.final_norm` -> `{side}.layer_norm`;
    LayerNorm or RMSNorm (`rms_norm=True`) with the model's epsilon (`config.layer_norm_epsilon`);
  * self-attention q/k/v -> one fused linear (rows [q; k; v], biases likewise), out -> linear[1]; decoder cross
    attention q -> linear[0], k/v fused -> linear[1], out -> linear[2]; each sublayer's pre-norm is its layer_norm;
  * FFN fc1 -> linear_0, fc2 -> linear_1; swiglu: gate half -> linear_0 (SiLU), linear half -> linear_0_noact;
    relu -> RELU, gelu -> GELU (exact erf form, as torch's default);
  * one embedding table for source, target and output projection (CTranslate2 aliases identical arrays), only the
    tokenizer's real pieces (the trainer's padding rows are dropped by the reference export); learned absolute
    positions 0..n-1 on each side from the one shared table (`position_encodings`); `scale_embeddings` set to the
    model's `embedding_scale` (token embeddings times sqrt(D) before the positions are added, or no scaling for
    models trained without it);
  * vocabulary: sentencepiece pieces in id order, so CTranslate2's ids are ours (pad/unk/bos/eos = 0/1/2/3);
    decoder start token bos (`<s>`), eos appended to the source by CTranslate2 (`add_source_eos`); the caller
    prepends the `<2xx>` target tag (`serving/ctranslate2_translator.py` does), as the trainer's data does.

Beside CTranslate2's files the directory holds `tokenizer.model` and `taskmoe_serving.json` (the served directions
with their source prefix, languages, special ids, position limits, the fixed gates of every MoE layer and where
the model came from), which `Ct2Translator` reads.

Legend: D model dim, V vocabulary, F FFN dim.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import ctranslate2
import numpy as np
import torch
from ctranslate2.converters import Converter
from ctranslate2.specs import common_spec, transformer_spec

from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
from megatron_taskmoe.data.tokenizer import lang_tag
from megatron_taskmoe.serving.dense import SIDES, DenseModel, densify
from megatron_taskmoe.serving.source import ReferenceSource

FORMAT = "megatron-taskmoe/ctranslate2"
FORMAT_VERSION = 1
SERVING_FILE = "taskmoe_serving.json"
TOKENIZER_FILE = "tokenizer.model"
QUANTIZATIONS = ("float32", "int8", "int8_float32", "int16", "float16", "bfloat16")
ACTIVATIONS = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU,
               "swiglu": common_spec.Activation.SWISH}


def embedding_scale(source: ReferenceSource) -> float:
    """The factor token embeddings are multiplied by before the positions are added (sqrt(D) or 1)."""
    return float(source.config.model.embedding_scale)


def _np(t: torch.Tensor) -> np.ndarray:
    """A float32 copy: CTranslate2's quantization rewrites the arrays it is given in place."""
    return t.detach().to(torch.float32).contiguous().numpy().copy()


def _set_norm(spec, state: dict, prefix: str) -> None:
    spec.gamma = _np(state[f"{prefix}.weight"])
    if f"{prefix}.bias" in state:
        spec.beta = _np(state[f"{prefix}.bias"])


def _set_linear(spec, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    spec.weight = _np(weight)
    if bias is not None:
        spec.bias = _np(bias)


def _fused(state: dict, prefix: str, names: Sequence[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    weight = torch.cat([state[f"{prefix}.{n}.weight"] for n in names], dim=0)
    biases = [state.get(f"{prefix}.{n}.bias") for n in names]
    return weight, (None if biases[0] is None else torch.cat(biases, dim=0))


def _set_self_attention(spec, state: dict, layer: str) -> None:
    _set_norm(spec.layer_norm, state, f"{layer}.self_attn_norm")
    _set_linear(spec.linear[0], *_fused(state, f"{layer}.self_attn", ("q_proj", "k_proj", "v_proj")))
    _set_linear(spec.linear[1], state[f"{layer}.self_attn.out_proj.weight"],
                state.get(f"{layer}.self_attn.out_proj.bias"))


def _set_cross_attention(spec, state: dict, layer: str) -> None:
    _set_norm(spec.layer_norm, state, f"{layer}.cross_attn_norm")
    _set_linear(spec.linear[0], state[f"{layer}.cross_attn.q_proj.weight"],
                state.get(f"{layer}.cross_attn.q_proj.bias"))
    _set_linear(spec.linear[1], *_fused(state, f"{layer}.cross_attn", ("k_proj", "v_proj")))
    _set_linear(spec.linear[2], state[f"{layer}.cross_attn.out_proj.weight"],
                state.get(f"{layer}.cross_attn.out_proj.bias"))


def _set_ffn(spec, dense: DenseModel, layer: str, activation: str) -> None:
    _set_norm(spec.layer_norm, dense.state, f"{layer}.ffn_norm")
    ffn = dense.ffn[layer]
    if activation == "swiglu":
        gate_w, linear_w = torch.chunk(ffn.fc1_weight, 2, dim=0)
        gate_b, linear_b = torch.chunk(ffn.fc1_bias, 2, dim=0) if ffn.fc1_bias is not None else (None, None)
        _set_linear(spec.linear_0, gate_w, gate_b)
        _set_linear(spec.linear_0_noact, linear_w, linear_b)
    else:
        _set_linear(spec.linear_0, ffn.fc1_weight, ffn.fc1_bias)
    _set_linear(spec.linear_1, ffn.fc2_weight, ffn.fc2_bias)


def transformer_spec_of(source: ReferenceSource, dense: DenseModel) -> transformer_spec.TransformerSpec:
    """CTranslate2's TransformerSpec of `dense` (see the module docstring for the mapping)."""
    arch = source.config.model
    spec = transformer_spec.TransformerSpec.from_config(
        (arch.encoder_layers, arch.decoder_layers), arch.num_attention_heads, pre_norm=True,
        activation=ACTIVATIONS[arch.activation], ffn_glu=arch.activation == "swiglu",
        rms_norm=arch.normalization == "RMSNorm")
    state = dense.state
    embed, positions = _np(state["embed_tokens.weight"]), _np(state["embed_positions.weight"])
    scale = embedding_scale(source)
    spec.encoder.embeddings[0].weight = embed
    spec.decoder.embeddings.weight = embed
    spec.decoder.projection.weight = embed
    for side in (spec.encoder, spec.decoder):
        side.scale_embeddings = scale if scale != 1.0 else False  # CTranslate2 takes the factor or a flag
        side.position_encodings.encodings = positions
    for name, side_spec in zip(SIDES, (spec.encoder, spec.decoder)):
        _set_norm(side_spec.layer_norm, state, f"{name}.final_norm")
        for i, layer_spec in enumerate(side_spec.layer):
            layer = f"{name}.layers.{i}"
            _set_self_attention(layer_spec.self_attention, state, layer)
            if name == "decoder":
                _set_cross_attention(layer_spec.attention, state, layer)
            _set_ffn(layer_spec.ffn, dense, layer, arch.activation)
    pieces = source.pieces()
    special = source.config.special_ids
    if len(pieces) != arch.vocab_size:
        raise CheckpointToolError(f"{source.where}: the tokenizer has {len(pieces)} pieces but the model "
                                  f"{arch.vocab_size}")
    spec.config.layer_norm_epsilon = arch.layernorm_epsilon
    spec.config.unk_token = pieces[special["unk"]]
    spec.config.bos_token = pieces[special["bos"]]
    spec.config.eos_token = pieces[special["eos"]]
    spec.config.decoder_start_token = pieces[special["bos"]]
    spec.config.add_source_bos = False
    spec.config.add_source_eos = True
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    return spec


class TaskSubnetworkConverter(Converter):
    """CTranslate2 converter of the dense network serving `directions` of a reference-format model."""

    def __init__(self, source: ReferenceSource, directions: Sequence[str]):
        self.source = source
        self.directions = list(directions)
        self.dense: Optional[DenseModel] = None

    def _load(self) -> transformer_spec.TransformerSpec:
        self.dense = densify(self.source.config, self.source.state, self.directions, self.source.where)
        return transformer_spec_of(self.source, self.dense)


def serving_record(source: ReferenceSource, dense: DenseModel, directions: Sequence[str],
                   quantization: str) -> dict:
    """`taskmoe_serving.json`: what a translator needs beside CTranslate2's files, and what was exported."""
    config, arch = source.config, source.config.model
    pieces = source.pieces()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "directions": {d: {"source_prefix": [lang_tag(d.split("-", 1)[1])]} for d in directions},
        "languages": list(config.languages),
        "language_tags": {lang: pieces[i] for lang, i in config.language_tags.items()},
        "special_ids": dict(config.special_ids),
        "max_source_positions": arch.max_source_positions,
        "max_target_positions": arch.max_target_positions,
        "vocab_size": arch.vocab_size,
        "embedding_scale": embedding_scale(source),
        "quantization": quantization,
        "ctranslate2_version": ctranslate2.__version__,
        "tokenizer_sha256": hashlib.sha256(source.tokenizer).hexdigest(),
        "parameters": dense.num_parameters(),
        "ffn_width": {layer: dense.ffn_width(layer, arch.activation) for layer in dense.ffn},
        "gates": [asdict(g) for g in dense.gates],
        "source": {"path": source.where, "task_map": config.task_map, "origin": config.source},
    }


def write_model(source: ReferenceSource, directions: Sequence[str], directory: Path, *,
                quantization: str = "float32") -> dict:
    """Convert into the existing, empty `directory` (CTranslate2's files, tokenizer.model, taskmoe_serving.json).
    Returns the serving record."""
    if quantization not in QUANTIZATIONS:
        raise CheckpointToolError(f"--quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    converter = TaskSubnetworkConverter(source, directions)
    converter.convert(str(directory), quantization=quantization, force=True)
    (directory / TOKENIZER_FILE).write_bytes(source.tokenizer)
    record = serving_record(source, converter.dense, directions, quantization)
    (directory / SERVING_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return record


def check_directory(path: str | os.PathLike) -> Path:
    path = Path(path)
    for name in ("model.bin", SERVING_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise CheckpointToolError(f"{path / name}: no such file (not written by export_ctranslate2.py)")
    return path


__all__ = ["FORMAT", "FORMAT_VERSION", "SERVING_FILE", "TOKENIZER_FILE", "QUANTIZATIONS", "embedding_scale",
           "transformer_spec_of", "TaskSubnetworkConverter", "serving_record", "write_model", "check_directory"]
