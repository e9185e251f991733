"""The sub-network that serves some directions of a task-routed model, as a plain dense Transformer.

Why it is exact. In a layer routed by task (`mode == "task"`, by task id or by target language), the router's logits
are one row of a per-task table, so for a fixed direction every token goes to the same top-k experts with the same
gate weights p_1..p_k. The layer computes sum_i p_i * fc2_i(act(fc1_i x)); since the activation is elementwise this
is ONE dense FFN of width k*F:

    fc1 = [fc1_1; ...; fc1_k]               (rows concatenated; swiglu: gate halves first, then linear halves)
    fc2 = [p_1 * fc2_1 | ... | p_k * fc2_k]  (columns concatenated, each expert's scaled by its gate weight)

Experts have no biases, so the dense FFN has none either. A layer of one expert (top-1 over E=1) has weight 1 in
every mode and is a dense FFN too. Dense layers stay as they are.

What cannot be expressed as a dense Transformer, and is refused with the layers named: experts chosen per token
(`token`, `task_token`) or per sentence (`sentence`); task adapters (a LayerNorm -> down -> relu -> up residual
bottleneck after the experts, per task or chosen per token); token dropping at inference (`eval_capacity_factor`
or `pad_to_capacity`: which tokens are dropped depends on the batch; a capacity used only in training is fine).
Directions served together must share every layer's gates exactly (e.g. all directions into one target language
of a model routed by target language), otherwise they are different dense networks and are refused with the first
layer where they differ.

The gate weights are computed with the reference model's own routing functions (`model/routing.py`), on the whole
task table as the reference router does, so they are the values the trained model uses.

Inputs are the reference model's tensors and `ArchConfig` (`reference/config.py`, `checkpoint_tools/export.py`).
Legend: G task-table rows, C task embedding dim, E experts, K top-k, F expert FFN dim, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
from megatron_taskmoe.model import routing as R
from megatron_taskmoe.reference.config import ArchConfig, ExportConfig

SIDES = ("encoder", "decoder")


class NotDenseError(CheckpointToolError):
    """The model (or the requested directions) cannot be served as one dense Transformer; names the layers."""


@dataclass(kw_only=True)
class Gate:
    """One MoE layer's fixed routing for the served directions."""

    layer: str
    """The MoE layer, `{side}.layers.{i}`."""
    experts: list[int]
    """The experts every token of the served directions goes to."""
    weights: list[float]
    """Each of those experts' fixed routing weight."""
    reason: str
    """Why the gates are fixed: task routing by which id, or a single expert."""


@dataclass(kw_only=True)
class DenseLayerFFN:
    """One layer's FFN in dense form (fc1 rows: 2F' for swiglu, gate half first)."""

    fc1_weight: torch.Tensor
    """Input projection of the dense FFN."""
    fc2_weight: torch.Tensor
    """Output projection of the dense FFN."""
    fc1_bias: Optional[torch.Tensor] = None
    """Bias of fc1, or None."""
    fc2_bias: Optional[torch.Tensor] = None
    """Bias of fc2, or None."""


@dataclass(kw_only=True)
class DenseModel:
    """The served directions' dense Transformer: every tensor except the FFNs is the reference model's own."""

    state: dict[str, torch.Tensor]
    """Reference tensors of everything but the FFNs (embeddings, attention, norms)."""
    ffn: dict[str, DenseLayerFFN]
    """`{side}.layers.{i}` -> its dense FFN."""
    gates: list[Gate] = field(default_factory=list)
    """The fixed routing of every MoE layer."""

    def num_parameters(self) -> int:
        """Parameters of the dense network (the shared embedding table once)."""
        ffn = sum(t.numel() for f in self.ffn.values()
                  for t in (f.fc1_weight, f.fc2_weight, f.fc1_bias, f.fc2_bias) if t is not None)
        return ffn + sum(t.numel() for t in self.state.values())

    def ffn_width(self, layer: str, activation: str) -> int:
        rows = self.ffn[layer].fc1_weight.shape[0]
        return rows // 2 if activation == "swiglu" else rows


def _moe_layers(arch: ArchConfig) -> list[tuple[str, int]]:
    return [(side, i) for side in SIDES for i in arch.moe_layers(side)]


def refusals(arch: ArchConfig) -> list[str]:
    """Why each part of the model cannot be a dense Transformer (empty when it can)."""
    moe = arch.moe
    if moe is None:
        return []
    problems = []
    for side in SIDES:
        layers = arch.moe_layers(side)
        spec = moe.side(side)
        if not layers or spec.mode == "task" or spec.num_experts == 1:
            continue
        names = ", ".join(f"{side}.layers.{i}" for i in layers)
        why = {"token": "route each token by its own representation",
               "sentence": "route each sentence by its mean representation",
               "task_token": "route each token by its representation concatenated with the task embedding"}[spec.mode]
        problems.append(f"{names}: {spec.num_experts} experts that {why} ({side} mode {spec.mode!r}), so the "
                        "experts used change from token to token")
    if moe.adapters.mode != "none" and _moe_layers(arch):
        names = ", ".join(f"{s}.layers.{i}" for s, i in _moe_layers(arch))
        problems.append(f"{names}: {moe.adapters.mode} task adapters (a LayerNorm -> down -> relu -> up residual "
                        "bottleneck after the experts), which a Transformer layer has no place for")
    if moe.capacity_factor is not None and _moe_layers(arch):
        problems.append(f"a capacity factor of {moe.capacity_factor} at inference (eval_capacity_factor, or "
                        "pad_to_capacity): experts drop tokens beyond their capacity, and which tokens are dropped "
                        "depends on the whole batch")
    return problems


def check_dense(arch: ArchConfig, where: str) -> None:
    problems = refusals(arch)
    if problems:
        raise NotDenseError(f"{where}: cannot be served as a dense Transformer exactly: " + "; ".join(problems)
                            + ". Only dense models and models whose MoE layers are all task-routed (mode 'task', "
                              "by task or target language) without adapters export")


def direction_rows(config: ExportConfig, directions: list[str]) -> dict[str, dict[str, int]]:
    """Each direction's task-table rows: {"task": task id, "target_language": target language id}."""
    out = {}
    for name in directions:
        src, _, tgt = name.partition("-")
        ids = config.direction(src, tgt)
        out[name] = {"task": ids["task_id"], "target_language": ids["tgt_lang_id"]}
    return out


def task_gate(arch: ArchConfig, state: dict[str, torch.Tensor], side: str, layer: int, row: int
              ) -> tuple[list[int], list[float]]:
    """Top-k experts and weights of task-table row `row` in one task-routed layer, as the reference router
    computes them (logits of the whole table in the router dtype, then `routing.topk_routing`)."""
    moe = arch.moe
    prefix = f"{side}.layers.{layer}.ffn.router"
    dtype = torch.float32 if moe.router_fp32 else state[f"{prefix}.weight"].dtype
    table_GE = F.linear(state[f"{prefix}.task_embedding"].to(dtype), state[f"{prefix}.weight"].to(dtype))
    probs_1E, map_1E = R.topk_routing(table_GE[row : row + 1], moe.topk, renormalize=moe.renormalize)
    experts = map_1E[0].nonzero().squeeze(-1).tolist()
    return experts, [float(probs_1E[0, e]) for e in experts]


def layer_gate(arch: ArchConfig, state: dict[str, torch.Tensor], side: str, layer: int,
               rows: dict[str, dict[str, int]]) -> Gate:
    """The fixed gate of one MoE layer, the same for every direction in `rows` (NotDenseError otherwise)."""
    spec = arch.moe.side(side)
    name = f"{side}.layers.{layer}"
    if spec.mode != "task":
        return Gate(layer=name, experts=[0], weights=[1.0], reason="a single expert")
    per_direction = {d: task_gate(arch, state, side, layer, r[spec.task_source]) for d, r in rows.items()}
    (first, gate), *rest = per_direction.items()
    for other, other_gate in rest:
        if other_gate != gate:
            raise NotDenseError(
                f"{name}: directions {first} and {other} route to different experts or weights ({gate[0]} with "
                f"{[round(w, 4) for w in gate[1]]} vs {other_gate[0]} with {[round(w, 4) for w in other_gate[1]]}); "
                "directions served by one dense network must share every layer's gates: export them one at a "
                "time (by target language for a model routed by target language)")
    return Gate(layer=name, experts=gate[0], weights=gate[1], reason=f"task routing by {spec.task_source}")


def dense_ffn(state: dict[str, torch.Tensor], layer: str, gate: Gate, activation: str) -> DenseLayerFFN:
    """The gate's experts as one dense FFN (see the module docstring)."""
    fc1_EFD = state[f"{layer}.ffn.experts.fc1_weight"]
    fc2_EDF = state[f"{layer}.ffn.experts.fc2_weight"]
    fc1 = [fc1_EFD[e] for e in gate.experts]
    if activation == "swiglu":
        halves = [torch.chunk(w, 2, dim=0) for w in fc1]
        fc1_weight = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    else:
        fc1_weight = torch.cat(fc1, dim=0)
    fc2_weight = torch.cat([(fc2_EDF[e].double() * w).to(fc2_EDF.dtype) for e, w in zip(gate.experts, gate.weights)],
                           dim=1)
    return DenseLayerFFN(fc1_weight=fc1_weight.contiguous(), fc2_weight=fc2_weight.contiguous())


def densify(config: ExportConfig, state: dict[str, torch.Tensor], directions: list[str], where: str) -> DenseModel:
    """The dense Transformer serving `directions` (names like "de-en") of the reference model `state`."""
    arch = config.model
    check_dense(arch, where)
    if not directions:
        raise NotDenseError(f"{where}: no direction to serve")
    rows = direction_rows(config, directions)
    moe_layers = set(f"{s}.layers.{i}" for s, i in _moe_layers(arch))
    ffn: dict[str, DenseLayerFFN] = {}
    gates = []
    rest = {k: v for k, v in state.items() if ".ffn." not in k}
    for side in SIDES:
        num = arch.encoder_layers if side == "encoder" else arch.decoder_layers
        for i in range(num):
            layer = f"{side}.layers.{i}"
            if layer in moe_layers:
                gate = layer_gate(arch, state, side, i, rows)
                gates.append(gate)
                ffn[layer] = dense_ffn(state, layer, gate, arch.activation)
            else:
                ffn[layer] = DenseLayerFFN(fc1_weight=state[f"{layer}.ffn.fc1.weight"],
                                           fc2_weight=state[f"{layer}.ffn.fc2.weight"],
                                           fc1_bias=state.get(f"{layer}.ffn.fc1.bias"),
                                           fc2_bias=state.get(f"{layer}.ffn.fc2.bias"))
    return DenseModel(state=rest, ffn=ffn, gates=gates)


def dense_ffn_forward(ffn: DenseLayerFFN, x_TD: torch.Tensor, activation: str) -> torch.Tensor:
    """The dense FFN's output (what CTranslate2's FeedForward computes); used by the tests."""
    h = F.linear(x_TD, ffn.fc1_weight, ffn.fc1_bias)
    if activation == "swiglu":
        gate, linear = torch.chunk(h, 2, dim=-1)
        h = F.silu(gate) * linear
    else:
        h = F.gelu(h) if activation == "gelu" else F.relu(h)
    return F.linear(h, ffn.fc2_weight, ffn.fc2_bias)


__all__ = ["NotDenseError", "Gate", "DenseLayerFFN", "DenseModel", "refusals", "check_dense", "direction_rows",
           "task_gate", "layer_gate", "dense_ffn", "densify", "dense_ffn_forward"]
