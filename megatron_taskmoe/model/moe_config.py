"""Configuration of the Mixture-of-Experts layers, their routing and the task adapters.

These dataclasses are the single source of truth for everything MoE: the model builder (`config.py`) maps
`MoEConfig` into megatron-core's `TransformerConfig` with `MoEConfig.megatron_kwargs()`, and `moe.py` /
`router.py` / `adapters.py` read the parts megatron does not know about (routing mode, task tables, adapters).

Routing is chosen separately for encoder and decoder (Kudugunta et al. 2021 use token routing in the encoder and
task routing in the decoder), hence two `RoutingConfig`s. Adapters (Pham et al. 2023, section 3) are one
`AdapterConfig` shared by both sides.

Legend: G tasks (rows of a task table: number of tasks, or number of languages when routing by target language),
E experts, C task embedding dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

ROUTING_MODES = ("token", "sentence", "task", "task_token")
TASK_SOURCES = ("task", "target_language")
ADAPTER_MODES = ("none", "static", "dynamic", "shared_dynamic")
DISPATCHERS = ("alltoall", "allgather")
PERMUTE_BACKENDS = ("auto", "torch", "extension")
DROP_POLICIES = ("probs", "position")
ROUTER_DTYPES = ("fp32", "input")


def _check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r} is not one of {list(choices)}")


def _check_positive_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{name}={value!r} must be a positive integer")


@dataclass(kw_only=True)
class RoutingConfig:
    """How one side (encoder or decoder) routes tokens to experts.

    Modes:
      - "token": the classic gate, softmax(W x) per token (GShard / Switch).
      - "sentence": every token of a sentence follows the gate applied to the sentence's masked mean
        representation (padding excluded), so a sentence goes to one expert set (Pham et al. "MoE Sentence").
      - "task": the logits come from a learned per-task table (task embedding -> linear gate); every token of a
        task goes to the same experts (Kudugunta et al. task-level routing). The table is indexed by
        `task_source`.
      - "task_token": task-aware token routing; the gate sees concat(token, task embedding), so the choice
        depends on both the token and its task (the MoE gate of Pham et al.'s shared-dynamic model).
    """

    mode: Literal["token", "sentence", "task", "task_token"] = "token"
    """How the router computes its logits: "token", "sentence", "task" or "task_token" (see above)."""
    task_source: Literal["task", "target_language"] = "task"
    """Which id indexes the task table in "task"/"task_token" modes: the task (language pair/direction) or the target
    language (Kudugunta et al. route decoder tokens by target language).
    """
    task_embed_dim: int = 64
    """Width C of the task embedding used by the "task" and "task_token" gates."""
    layer_freq: int = 1
    """Which FFNs of this side are MoE: 1 = every layer, 2 = every other layer (layers 0, 2, 4, ... as megatron's
    moe_layer_freq), 0 = none (a dense side).
    """
    num_experts: int | None = None
    """Experts in this side's MoE layers; None means MoEConfig.num_experts. A task sub-network extracted from a
    task-routed side (checkpoint_tools/extract.py) keeps only the experts its tasks route to, so its two sides can
    differ (e.g. a token-routed encoder keeps all 8 experts, the target-routed decoder 2).
    """
    capacity_num_experts: int | None = None
    """E in this side's capacity formula (capacity = ceil(tokens * topk / E * capacity_factor)); None means the side's
    experts. A sub-network extracted from a task-routed side keeps the full model's E here, so each kept expert
    accepts as many tokens as before and exactly the same tokens are dropped.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_choice("RoutingConfig", "mode", self.mode, ROUTING_MODES)
        _check_choice("RoutingConfig", "task_source", self.task_source, TASK_SOURCES)
        _check_positive_int("RoutingConfig", "task_embed_dim", self.task_embed_dim)
        if not isinstance(self.layer_freq, int) or self.layer_freq < 0:
            raise ValueError(f"RoutingConfig.layer_freq={self.layer_freq!r} must be an integer >= 0")
        if self.num_experts is not None:
            _check_positive_int("RoutingConfig", "num_experts", self.num_experts)
        if self.capacity_num_experts is not None:
            _check_positive_int("RoutingConfig", "capacity_num_experts", self.capacity_num_experts)

    @property
    def uses_task_ids(self) -> bool:
        return self.mode in ("task", "task_token")

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether the FFN of the 0-based `layer_index`-th layer of this side is an MoE layer."""
        return self.layer_freq > 0 and layer_index % self.layer_freq == 0

    def moe_layer_pattern(self, num_layers: int) -> list[int]:
        """megatron-style `moe_layer_freq` list: 1 for MoE, 0 for dense, one entry per layer."""
        return [int(self.is_moe_layer(i)) for i in range(num_layers)]


@dataclass(kw_only=True)
class AdapterConfig:
    """Task adapters on top of each MoE layer (Pham et al. 2023, section 3).

    Modes:
      - "none": no adapter.
      - "static": one bottleneck adapter per task (G adapters); a token uses its task's adapter.
      - "dynamic": L < G shared adapters (default L = ceil(log2 G)); a learned task gate over
        concat(token, task embedding) picks the top-k adapters per token.
      - "shared_dynamic": as "dynamic", and the task gate shares its task embedding table with the MoE gate of
        the same layer (the MoE side must then route with "task" or "task_token"; one table per MoE layer, so no
        parameter crosses a pipeline stage).
    """

    mode: Literal["none", "static", "dynamic", "shared_dynamic"] = "none"
    """Which adapters: "none", "static", "dynamic" or "shared_dynamic" (see above)."""
    task_embed_dim: int = 64
    """Width C of the task embedding the task gate sees (paper: 64)."""
    hidden_size: int = 256
    """Bottleneck width of every adapter (paper: 256)."""
    num_adapters: int | None = None
    """Number L of shared adapters in the dynamic modes; None means ceil(log2(number of tasks)), at least 2."""
    topk: int = 1
    """How many adapters each token uses in the dynamic modes."""
    task_source: Literal["task", "target_language"] = "task"
    """Which id indexes the adapters/task table: the task (language pair) or the target language."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_choice("AdapterConfig", "mode", self.mode, ADAPTER_MODES)
        _check_choice("AdapterConfig", "task_source", self.task_source, TASK_SOURCES)
        _check_positive_int("AdapterConfig", "task_embed_dim", self.task_embed_dim)
        _check_positive_int("AdapterConfig", "hidden_size", self.hidden_size)
        _check_positive_int("AdapterConfig", "topk", self.topk)
        if self.num_adapters is not None:
            _check_positive_int("AdapterConfig", "num_adapters", self.num_adapters)
            if self.topk > self.num_adapters:
                raise ValueError(
                    f"AdapterConfig.topk={self.topk} exceeds AdapterConfig.num_adapters={self.num_adapters}"
                )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_dynamic(self) -> bool:
        return self.mode in ("dynamic", "shared_dynamic")

    def resolved_num_adapters(self, num_task_rows: int) -> int:
        """L for the dynamic modes: the configured number or ceil(log2(G)) (at least 2, so a gate has a choice)."""
        if self.num_adapters is not None:
            return self.num_adapters
        return max(2, math.ceil(math.log2(max(num_task_rows, 1))))


@dataclass(kw_only=True)
class MoEConfig:
    """Everything about the MoE layers of one encoder-decoder model.

    `capacity_factor=None` is dropless; a number enables megatron-style token dropping in training (tokens beyond an
    expert's capacity = ceil(tokens * topk / experts * factor) are dropped by `drop_policy`: "probs" keeps the
    highest routing probabilities, "position" the earliest tokens); `eval_capacity_factor` is the factor outside
    training (None: no dropping). The load-balancing loss is GShard's (Pham et al. use
    it; equal to megatron's "aux_loss" and DeepSpeed's `l_aux`), computed over non-padding tokens only.
    """

    num_experts: int = 8
    """Experts E in every MoE layer (a side's RoutingConfig.num_experts can override it)."""
    topk: int = 2
    """1 (Switch) or 2 (GShard, the paper's setting: top-2 of the softmax, renormalized over the two)."""
    renormalize_topk: bool = True
    """Top-2 weights renormalized to sum to 1 (GShard); False keeps the raw softmax probabilities. Top-1 always uses
    the raw probability (Switch): a renormalized top-1 weight is constant 1 and the gate gets no gradient.
    """
    capacity_factor: float | None = None
    """Capacity factor in training; None is dropless, a number drops the tokens beyond an expert's capacity (see
    above).
    """
    eval_capacity_factor: float | None = None
    """Capacity factor outside training (validation, evaluation, decoding); None drops nothing there, so a sentence's
    translation does not depend on its batch-mates or the beam size (NLLB-MoE's eval capacity, off by default).
    Models with pad_to_capacity keep the training capacity everywhere (their fixed shapes need it).
    """
    drop_policy: Literal["probs", "position"] = "probs"
    """Which tokens an expert over capacity keeps: "probs" the highest routing probabilities, "position" the earliest
    tokens.
    """
    pad_to_capacity: bool = False
    """Pad every expert's input to its capacity (fixed shapes) when dropping tokens."""
    aux_loss_coeff: float = 1e-2
    """Weight of the load-balancing loss; 0 disables it."""
    z_loss_coeff: float = 0.0
    """Router z-loss (ST-MoE); 0 disables it."""
    expert_ffn_hidden_size: int | None = None
    """Expert FFN width; None uses the model's FFN width (Pham et al.: experts the size of the replaced FFN)."""
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """megatron-core's token dispatcher between expert-parallel ranks."""
    permute_backend: Literal["auto", "torch", "extension"] = "auto"
    """Permutation implementation (ops/): "torch" pure torch, "extension" the compiled kernels, "auto" the extension
    when it is built for this device, else torch.
    """
    router_dtype: Literal["fp32", "input"] = "fp32"
    """Router logits in fp32 (stable under bf16) or in the input's dtype."""
    encoder: RoutingConfig = field(default_factory=RoutingConfig)
    """Routing of the encoder's MoE layers."""
    decoder: RoutingConfig = field(default_factory=RoutingConfig)
    """Routing of the decoder's MoE layers."""
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    """Task adapters of both sides."""
    num_tasks: int = 1
    """Number of tasks, the size of the task id space (task ids are indexes into the manifest's task list); it sizes
    the task tables and the static adapters.
    """
    num_languages: int = 1
    """Number of languages, the size of the language id space (language ids are indexes into the manifest's sorted
    language list); it sizes the task tables and the static adapters indexed by language.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_positive_int("MoEConfig", "num_experts", self.num_experts)
        if self.topk not in (1, 2):
            raise ValueError(f"MoEConfig.topk={self.topk!r} must be 1 or 2")
        if self.topk > self.num_experts:
            raise ValueError(f"MoEConfig.topk={self.topk} exceeds MoEConfig.num_experts={self.num_experts}")
        if self.capacity_factor is not None and not (self.capacity_factor > 0):
            raise ValueError(f"MoEConfig.capacity_factor={self.capacity_factor!r} must be > 0 or None (dropless)")
        if self.eval_capacity_factor is not None and not (self.eval_capacity_factor > 0):
            raise ValueError(f"MoEConfig.eval_capacity_factor={self.eval_capacity_factor!r} must be > 0 or None")
        if self.eval_capacity_factor is not None and self.capacity_factor is None:
            raise ValueError("MoEConfig.eval_capacity_factor needs a capacity_factor (a dropless model drops nothing "
                             "in evaluation either)")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("MoEConfig.pad_to_capacity=True needs a capacity_factor (dropless has no capacity)")
        _check_choice("MoEConfig", "drop_policy", self.drop_policy, DROP_POLICIES)
        _check_choice("MoEConfig", "token_dispatcher", self.token_dispatcher, DISPATCHERS)
        _check_choice("MoEConfig", "permute_backend", self.permute_backend, PERMUTE_BACKENDS)
        _check_choice("MoEConfig", "router_dtype", self.router_dtype, ROUTER_DTYPES)
        if self.aux_loss_coeff < 0 or self.z_loss_coeff < 0:
            raise ValueError(
                f"MoEConfig.aux_loss_coeff={self.aux_loss_coeff} and z_loss_coeff={self.z_loss_coeff} must be >= 0"
            )
        if self.expert_ffn_hidden_size is not None:
            _check_positive_int("MoEConfig", "expert_ffn_hidden_size", self.expert_ffn_hidden_size)
        _check_positive_int("MoEConfig", "num_tasks", self.num_tasks)
        _check_positive_int("MoEConfig", "num_languages", self.num_languages)
        for side in ("encoder", "decoder"):
            if not isinstance(getattr(self, side), RoutingConfig):
                raise ValueError(f"MoEConfig.{side} must be a RoutingConfig, got {type(getattr(self, side))}")
            getattr(self, side).validate()
            if self.topk > self.side_num_experts(side):
                raise ValueError(f"MoEConfig.topk={self.topk} exceeds MoEConfig.{side}.num_experts="
                                 f"{self.side_num_experts(side)}")
        if not isinstance(self.adapters, AdapterConfig):
            raise ValueError(f"MoEConfig.adapters must be an AdapterConfig, got {type(self.adapters)}")
        self.adapters.validate()
        if self.adapters.is_dynamic:
            num_adapters = self.adapters.resolved_num_adapters(self.num_task_rows(self.adapters.task_source))
            if self.adapters.topk > num_adapters:
                raise ValueError(
                    f"MoEConfig.adapters.topk={self.adapters.topk} exceeds the {num_adapters} dynamic adapters"
                )
        if self.adapters.mode == "shared_dynamic":
            for side in ("encoder", "decoder"):
                routing = getattr(self, side)
                if routing.layer_freq == 0:
                    continue
                if not routing.uses_task_ids:
                    raise ValueError(
                        f"MoEConfig.adapters.mode='shared_dynamic' shares the task embedding with the MoE gate, so "
                        f"MoEConfig.{side}.mode must be 'task' or 'task_token', got {routing.mode!r}"
                    )
                if routing.task_embed_dim != self.adapters.task_embed_dim:
                    raise ValueError(
                        f"MoEConfig.adapters.mode='shared_dynamic': MoEConfig.{side}.task_embed_dim="
                        f"{routing.task_embed_dim} must equal adapters.task_embed_dim={self.adapters.task_embed_dim}"
                    )
                if routing.task_source != self.adapters.task_source:
                    raise ValueError(
                        f"MoEConfig.adapters.mode='shared_dynamic': MoEConfig.{side}.task_source="
                        f"{routing.task_source!r} must equal adapters.task_source={self.adapters.task_source!r}"
                    )

    def side(self, side: str) -> RoutingConfig:
        if side not in ("encoder", "decoder"):
            raise ValueError(f"side={side!r} must be 'encoder' or 'decoder'")
        return getattr(self, side)

    def side_num_experts(self, side: str) -> int:
        """E of `side`'s MoE layers: its `RoutingConfig.num_experts` override, else `num_experts`."""
        override = self.side(side).num_experts
        return self.num_experts if override is None else override

    def side_capacity_experts(self, side: str) -> int:
        """E of `side`'s capacity formula: its `RoutingConfig.capacity_num_experts`, else its expert count."""
        override = self.side(side).capacity_num_experts
        return self.side_num_experts(side) if override is None else override

    def inference_capacity_factor(self) -> float | None:
        """The capacity factor outside training: `eval_capacity_factor`, or the training one with pad_to_capacity."""
        return self.capacity_factor if self.pad_to_capacity else self.eval_capacity_factor

    def num_task_rows(self, task_source: str) -> int:
        """G, the rows of a task table indexed by `task_source`."""
        _check_choice("MoEConfig", "task_source", task_source, TASK_SOURCES)
        return self.num_tasks if task_source == "task" else self.num_languages

    def megatron_kwargs(self) -> dict:
        """The `TransformerConfig` fields for megatron-core's MoELayer and dispatchers.

        Our router computes logits, top-k, capacity and the losses itself (routing.py), from these same fields,
        so megatron's own validation of them applies unchanged. `moe_layer_freq` is per side: see
        `RoutingConfig.moe_layer_pattern`.
        """
        return dict(
            num_moe_experts=self.num_experts,
            moe_router_topk=self.topk,
            # GShard renormalized top-k == megatron's default (top-k on logits, softmax over the k selected);
            # pre-softmax (softmax over all experts, then top-k) keeps raw probabilities.
            moe_router_pre_softmax=self.topk == 1 or not self.renormalize_topk,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss" if self.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=self.aux_loss_coeff,
            moe_z_loss_coeff=self.z_loss_coeff if self.z_loss_coeff > 0 else None,
            moe_expert_capacity_factor=self.capacity_factor,
            moe_token_drop_policy=self.drop_policy,
            moe_pad_expert_input_to_capacity=self.pad_to_capacity,
            moe_token_dispatcher_type=self.token_dispatcher,
            moe_ffn_hidden_size=self.expert_ffn_hidden_size,
            moe_router_dtype="fp32" if self.router_dtype == "fp32" else None,
            moe_grouped_gemm=False,
        )
