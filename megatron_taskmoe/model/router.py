"""Our megatron-core router: token, sentence, task and task-aware token routing, GShard loss without padding.

`TaskTopKRouter` subclasses megatron-core 0.16.1's `TopKRouter` and is plugged in through
`MoESubmodules(router=...)` (see `moe.py`), so `MoELayer`, its token dispatchers and experts are megatron's.
What differs from megatron's router:
  * logits by the configured mode (pure functions in `routing.py`), with our own linear: megatron's
    `Router.gating` moves weights to CUDA and its `router_gating_linear` needs Transformer Engine;
  * the GShard load-balancing loss (first-choice counts, as Pham et al. and DeepSpeed) and the z-loss, over
    non-padding tokens only and exact under sequence parallelism (the per-rank losses sum to the global one; with
    per-token loss normalisation, `calculate_per_token_loss`, each is weighted by the real-token count summed over
    the sequence-parallel ranks, so the weighted losses sum to the global one too);
  * token dropping where padding tokens never displace real ones, with a deterministic tie-break, in training only
    unless `MoEConfig.eval_capacity_factor` says otherwise (a translation must not depend on its batch);
  * routing statistics (expert load per task) for validation, and training telemetry (`routing_counts.py`).
Task ids come from the model's `TaskContext` (the router is called with `(hidden_states, padding_mask)` only).

Parameters replicated across tensor-parallel ranks (gate weight, task table) get the `sequence_parallel`
attribute as megatron's router does: under sequence parallelism each rank sees S/TP positions, so their gradients
are partial and megatron's `finalize_model_grads` all-reduces them over the TP group.

Legend: L local sequence length (S/TP under sequence parallelism), B batch, D model dim, T = L*B local tokens,
E experts, G task-table rows, C task embedding dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_taskmoe.compat import aux_losses
from megatron_taskmoe.model import routing as R
from megatron_taskmoe.model.moe_config import MoEConfig
from megatron_taskmoe.model.routing_counts import RoutingCounters, add_task_counts_
from megatron_taskmoe.model.task_context import TaskContext


class TaskTopKRouter(TopKRouter):
    """Top-k router whose logits come from tokens, sentences, tasks, or tokens and tasks (see `RoutingConfig`)."""

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection=None,
        *,
        moe_config: MoEConfig,
        side: str,
        task_context: TaskContext | None,
        **megatron_kwargs,
    ) -> None:
        # megatron_kwargs: what this megatron-core release's MoELayer passes on (from 0.17: is_mtp_layer), handed
        # to TopKRouter unchanged.
        if config.moe_router_enable_expert_bias:
            raise ValueError("TaskTopKRouter: moe_router_enable_expert_bias is not supported (GShard aux loss instead)")
        if config.moe_router_load_balancing_type not in ("aux_loss", "none"):
            raise ValueError(
                f"TaskTopKRouter: moe_router_load_balancing_type={config.moe_router_load_balancing_type!r}; only "
                "'aux_loss' (computed as GShard's loss) or 'none' are supported"
            )
        if config.moe_router_score_function != "softmax":
            raise ValueError("TaskTopKRouter: only the softmax score function is supported (GShard routing)")
        if config.moe_router_num_groups or config.moe_router_group_topk or config.moe_router_topk_scaling_factor:
            raise ValueError("TaskTopKRouter: group-limited routing and top-k scaling are not supported")
        super().__init__(config=config, pg_collection=pg_collection, **megatron_kwargs)
        self.moe_config = moe_config
        self.side = side
        self.routing_config = moe_config.side(side)
        self.mode = self.routing_config.mode
        self.task_context = task_context
        if (self.routing_config.uses_task_ids or (self.mode, side) == ("sentence", "decoder")) and task_context is None:
            raise ValueError(f"TaskTopKRouter: {side} routing mode {self.mode!r} needs a TaskContext")
        self.aux_loss_coeff = config.moe_aux_loss_coeff if config.moe_router_load_balancing_type == "aux_loss" else 0.0
        self.z_loss_coeff = config.moe_z_loss_coeff or 0.0

        self.task_embedding = None
        if self.routing_config.uses_task_ids:
            num_rows = moe_config.num_task_rows(self.routing_config.task_source)
            embed_dim = self.routing_config.task_embed_dim
            gate_in = embed_dim if self.mode == "task" else config.hidden_size + embed_dim
            self.weight = torch.nn.Parameter(torch.empty((self.num_experts, gate_in), dtype=torch.float32))
            self.task_embedding = torch.nn.Parameter(torch.empty((num_rows, embed_dim), dtype=torch.float32))
            self.reset_parameters()

        # Routing statistics (local counts, not parameters): assignments per (task, expert) after dropping, and
        # real tokens per task. Enabled by `moe.set_routing_stats(model, True)`.
        self.collect_stats = False
        self.stats_assignments_GE: torch.Tensor | None = None
        self.stats_tokens_G: torch.Tensor | None = None
        # Training telemetry (routing_counts.RoutingCounters), counted in training forwards only; enabled by
        # `moe.set_routing_telemetry(model, True)`.
        self.telemetry: RoutingCounters | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_z_loss: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        table = getattr(self, "task_embedding", None)
        if table is not None:
            if self.config.perform_initialization:
                # Unit-scale rows, comparable to the normalized token representation they are concatenated with.
                torch.nn.init.normal_(table, mean=0.0, std=1.0)
            table.data = table.data.to(dtype=self.config.params_dtype)
            setattr(table, "sequence_parallel", self.config.sequence_parallel)

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def _router_dtype(self) -> torch.dtype | None:
        return torch.float32 if self.config.moe_router_dtype == "fp32" else None

    @property
    def _sequence_parallel(self) -> bool:
        return bool(self.config.sequence_parallel) and get_pg_size(self.tp_group) > 1

    def _sp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a no-grad statistic over the ranks sharing the sequence (identity without sequence parallelism)."""
        if not self._sequence_parallel:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=self.tp_group)
        return tensor

    def _local_padding_mask(self, padding_mask: torch.Tensor | None, local_len: int, batch: int):
        """This rank's [L, B] padding mask: megatron's argument when it fits, else the TaskContext's."""
        tp_size, tp_rank, sp = get_pg_size(self.tp_group), get_pg_rank(self.tp_group), self._sequence_parallel
        if padding_mask is not None:
            padding_mask = padding_mask.bool()
            if tuple(padding_mask.shape) == (local_len, batch):
                return padding_mask
            if sp and tuple(padding_mask.shape) == (local_len * tp_size, batch):
                return padding_mask[tp_rank * local_len : (tp_rank + 1) * local_len]
            raise ValueError(
                f"TaskTopKRouter({self.side}): padding mask of shape {tuple(padding_mask.shape)} does not fit "
                f"hidden states of [L, B] = [{local_len}, {batch}]"
            )
        if self.task_context is not None and self.task_context.active:
            return self.task_context.padding_mask(self.side, local_len, tp_rank, tp_size, sp)
        return None

    def task_table(self) -> torch.Tensor:
        """The task embedding table [G, C] (shared with the adapters' gate in the shared-dynamic model)."""
        if self.task_embedding is None:
            raise RuntimeError(f"TaskTopKRouter({self.side}): mode {self.mode!r} has no task embedding table")
        return self.task_embedding

    def compute_logits(self, x_LBD: torch.Tensor, padding_mask_LB: torch.Tensor | None) -> torch.Tensor:
        """Router logits [T, E] for the local tokens by the configured mode."""
        local_len, batch, hidden = x_LBD.shape
        dtype = self._router_dtype
        if self.mode == "token":
            return R.token_logits(x_LBD.reshape(-1, hidden), self.weight, self.bias, dtype)
        if self.mode == "sentence" and self.side == "decoder":
            # The decoder routes by its source sentence (the whole target follows one expert set, and teacher
            # forcing sees no more of the target than decoding does): the model sets the mean encoder output.
            mean_BD = self.task_context.source_mean()
            return R.sentence_logits(mean_BD.to(dtype or x_LBD.dtype), local_len, self.weight, self.bias, dtype)
        if self.mode == "sentence":
            sum_BD, count_B = R.sentence_masked_sum(x_LBD.to(dtype or x_LBD.dtype), padding_mask_LB)
            if self._sequence_parallel:
                # Autograd-aware: the backward all-reduces too, so every rank's tokens get the gradient of the
                # sentence mean from all ranks' losses.
                sum_BD = dist_fn.all_reduce(sum_BD, group=self.tp_group)
                count_B = self._sp_sum(count_B)
            return R.sentence_logits(R.sentence_mean(sum_BD, count_B), local_len, self.weight, self.bias, dtype)
        ids_T = self.task_context.token_ids(self.routing_config.task_source, local_len * batch, device=x_LBD.device)
        if self.mode == "task":
            table_GE = R.task_logit_table(self.task_embedding, self.weight, self.bias, dtype)
            return R.task_logits(table_GE, ids_T)
        if self.mode == "task_token":
            task_emb_TC = self.task_embedding.index_select(0, ids_T)
            return R.task_token_logits(x_LBD.reshape(-1, hidden), task_emb_TC, self.weight, self.bias, dtype)
        raise ValueError(f"TaskTopKRouter: unknown routing mode {self.mode!r}")

    def fixed_route(self) -> tuple[list[int], torch.Tensor] | None:
        """(experts, probs_K) when every token of the current micro-batch takes the same route, as `forward` would
        give it: an inference forward (no capacity at inference, no statistics being counted) of a task-routed
        layer over a micro-batch of one task row. None otherwise. `TaskMoEMLP` then runs those experts on all
        tokens instead of routing and permuting them."""
        if (self.mode != "task" or self.training or self.collect_stats
                or self.moe_config.inference_capacity_factor() is not None):
            return None
        row = self.task_context.single_id(self.routing_config.task_source)
        if row is None:
            return None
        table_GE = R.task_logit_table(self.task_embedding, self.weight, self.bias, self._router_dtype)
        experts_K, probs_K = R.task_route(table_GE, row, self.topk, renormalize=not self.config.moe_router_pre_softmax)
        return experts_K.tolist(), probs_K

    def _log(self, name: str, value: torch.Tensor) -> None:
        """Megatron's aux-loss tracker, one name per side (encoder and decoder layer numbers both start at 1).
        Under sequence parallelism `value` is this rank's share: the tracker sums it over the TP group."""
        if self.layer_number is not None and self.layer_number <= self.config.num_layers:
            group = self.tp_group if self._sequence_parallel else None
            aux_losses.record_aux_loss(
                f"{self.side}_{name}", value, self.layer_number, self.config.num_layers, reduce_group=group
            )

    # ------------------------------------------------------------------------------------------ routing
    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Top-k, capacity and losses on logits [T, E] (or [L, B, E]); `padding_mask` True at padding, any shape
        with T elements. Returns (probs [T, E], routing_map [T, E]) as megatron's dispatchers expect."""
        logits_TE = logits.reshape(-1, self.num_experts)
        valid_T = None if padding_mask is None else ~padding_mask.reshape(-1).bool()
        training = self.training and torch.is_grad_enabled()

        if training and self.z_loss_coeff > 0:
            local_count = (
                valid_T.sum() if valid_T is not None else torch.tensor(logits_TE.shape[0], device=logits_TE.device)
            )
            global_count = self._sp_sum(local_count.to(torch.float32).reshape(1)).reshape(())
            z = R.z_loss(logits_TE, valid_T, global_count)
            scale = global_count if self.calculate_per_token_loss else 1.0
            logits_TE = MoEAuxLossAutoScaler.apply(logits_TE, self.z_loss_coeff * z * scale)
            self.last_z_loss = z.detach()
            self._log("z_loss", z.detach())

        probs_TE, routing_map_TE = R.topk_routing(logits_TE, self.topk, renormalize=not self.config.moe_router_pre_softmax)
        capacity_factor = (self.config.moe_expert_capacity_factor if self.training
                           else self.moe_config.inference_capacity_factor())
        if capacity_factor is not None:
            capacity = R.expert_capacity(
                logits_TE.shape[0],
                self.routing_config.capacity_num_experts or self.num_experts,
                self.topk,
                capacity_factor,
            )
            probs_TE, routing_map_TE = R.drop_over_capacity(
                probs_TE,
                routing_map_TE,
                capacity,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
                valid_T=valid_T,
            )

        if training and self.aux_loss_coeff > 0:
            scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
            counts_E, num_tokens = R.top1_counts(scores_TE, valid_T)
            packed = self._sp_sum(torch.cat([counts_E, num_tokens.reshape(1).to(counts_E.dtype)]))
            aux = R.gshard_load_balancing_loss(scores_TE, packed[:-1], packed[-1], valid_T)
            scale = packed[-1] if self.calculate_per_token_loss else 1.0
            probs_TE = MoEAuxLossAutoScaler.apply(probs_TE, self.aux_loss_coeff * aux * scale)
            self.last_aux_loss = aux.detach()
            self._log("load_balancing_loss", aux.detach())

        if self.collect_stats or (training and self.telemetry is not None):
            self._record_stats(logits_TE, routing_map_TE, valid_T, training)
        return probs_TE, routing_map_TE

    def _record_stats(self, logits_TE, routing_map_TE, valid_T, training: bool) -> None:
        """Validation statistics (`collect_stats`) and, in training, telemetry (`routing_counts.py`), which also
        counts the choices before capacity dropping (the top-k of the same logits, recomputed when dropping)."""
        with torch.no_grad():
            ids_T = None
            if self.task_context is not None and self.task_context.has_ids("task"):
                ids_T = self.task_context.token_ids("task", routing_map_TE.shape[0], device=routing_map_TE.device)
            if training and self.telemetry is not None:
                routed_map_TE = routing_map_TE
                if self.config.moe_expert_capacity_factor is not None:
                    routed_map_TE = R.topk_routing(logits_TE.detach(), self.topk)[1]
                self.telemetry.add_router(logits_TE, routed_map_TE, routing_map_TE, valid_T, ids_T)
            if self.collect_stats and ids_T is not None:
                if self.stats_assignments_GE is None:
                    self.init_stats(ids_T.device)
                add_task_counts_(self.stats_assignments_GE, self.stats_tokens_G, ids_T, routing_map_TE, valid_T)

    def init_stats(self, device: torch.device) -> None:
        rows = self.moe_config.num_tasks
        self.stats_assignments_GE = torch.zeros(rows, self.num_experts, dtype=torch.float64, device=device)
        self.stats_tokens_G = torch.zeros(rows, dtype=torch.float64, device=device)

    def reset_stats(self) -> None:
        self.stats_assignments_GE = None
        self.stats_tokens_G = None

    def init_telemetry(self, device: torch.device) -> None:
        self.telemetry = RoutingCounters("experts", num_choices=self.num_experts,
                                         num_task_rows=self.moe_config.num_tasks, device=device)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """input [L, B, D] (the sequence-parallel shard); padding_mask [L, B] or [S, B], True at padding, or None
        (then the TaskContext's mask for this side is used when it has one)."""
        if input.dim() != 3:
            raise ValueError(f"TaskTopKRouter({self.side}) expects hidden states [L, B, D], got {tuple(input.shape)}")
        local_len, batch, _ = input.shape
        input = self.apply_input_jitter(input)
        padding_mask_LB = self._local_padding_mask(padding_mask, local_len, batch)
        logits_TE = self.compute_logits(input, padding_mask_LB)
        return self.routing(logits_TE, padding_mask_LB)
