"""Task adapters of Pham et al. 2023 (section 3): static, dynamic and shared-dynamic.

Placement. The paper puts the task adapters "on top of MoE layers" (section 1: "our design of putting those
adapters on top of MoE layers allows for flexibility ... we only finetune new adapters"; section 5.2.1: "MoE should
be the foundational infrastructure, and on top of that, task adapters should be used"). So an adapter here
transforms the MoE layer's output h before the layer's residual connection: the MLP slot returns
h + sum_{l in G_t} w_l * A_l(h), a residual bottleneck adapter A(h) = W_up relu(W_down LN(h)) (width 256 by
default). Keeping the adapter residual, with its up-projection initialised to zero, means a new adapter added to a
trained model leaves its outputs unchanged until trained, the paper's motivation for the design.

Modes:
  * static: adapter l = the token's task (one adapter per task row, weight 1);
  * dynamic: L shared adapters (ceil(log2 G) by default); a task gate over concat(h, task embedding) (eq. 6) picks
    the top-k; an adapter's output is weighted by its softmax probability (eq. 7), so the gate is trained by the
    translation loss also with top-1 (no renormalization, which would make a top-1 weight constant);
  * shared_dynamic: as dynamic, with the task embedding table of the same layer's MoE router (its "task" or
    "task_token" gate), so the task gate and the MoE gate share one representation of the task. The table is
    owned by the router and only referenced here (not registered twice), and it is per MoE layer, so nothing is
    shared across pipeline stages.

Batched: each adapter runs once on the tokens routed to it (a loop over the L adapters, never over tokens). All
parameters are replicated across tensor-parallel ranks and act on the sequence-parallel shard, so they carry the
`sequence_parallel` attribute like megatron's norms and router (their gradients are all-reduced over TP).

Legend: L local sequence length, B batch, D model dim, T = L*B tokens, A adapters, H adapter width, G task rows,
C task embedding dim.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_taskmoe.model.moe_config import MoEConfig
from megatron_taskmoe.model.routing_counts import RoutingCounters, add_task_counts_
from megatron_taskmoe.model.task_context import TaskContext


def adapter_choice(
    gate_logits_TA: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic adapters' top-k: weights [T, A] = softmax probabilities of the chosen (zero elsewhere), and the map."""
    probs_TA = torch.softmax(gate_logits_TA, dim=-1, dtype=torch.float32).to(gate_logits_TA.dtype)
    top_probs_TK, top_idx_TK = torch.topk(probs_TA, k=topk, dim=-1)
    weights_TA = torch.zeros_like(probs_TA).scatter(-1, top_idx_TK, top_probs_TK)
    map_TA = torch.zeros_like(probs_TA, dtype=torch.bool).scatter(-1, top_idx_TK, True)
    return weights_TA, map_TA


def bottleneck(
    x_ND: torch.Tensor,
    ln_w_D: torch.Tensor,
    ln_b_D: torch.Tensor,
    down_DH: torch.Tensor,
    down_b_H: torch.Tensor,
    up_HD: torch.Tensor,
    up_b_D: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """One adapter's residual branch W_up relu(W_down LN(x)) (the caller adds x)."""
    y_ND = F.layer_norm(x_ND, (x_ND.shape[-1],), ln_w_D, ln_b_D, eps)
    return F.relu(y_ND @ down_DH + down_b_H) @ up_HD + up_b_D


class TaskAdapters(MegatronModule):
    """The adapters of one MoE layer (see the module docstring)."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        moe_config: MoEConfig,
        side: str,
        task_context: TaskContext,
        shared_task_table: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(config)
        cfg = moe_config.adapters
        if not cfg.enabled:
            raise ValueError("TaskAdapters: MoEConfig.adapters.mode is 'none'")
        if task_context is None:
            raise ValueError("TaskAdapters: task adapters need the model's TaskContext")
        self.adapter_config = cfg
        self.moe_config = moe_config
        self.side = side
        self.mode = cfg.mode
        self.task_context = task_context
        self.num_rows = moe_config.num_task_rows(cfg.task_source)
        hidden, width = config.hidden_size, cfg.hidden_size
        self.num_adapters = self.num_rows if cfg.mode == "static" else cfg.resolved_num_adapters(self.num_rows)
        self.topk = 1 if cfg.mode == "static" else cfg.topk
        self.eps = config.layernorm_epsilon
        num, dtype = self.num_adapters, config.params_dtype

        def param(*shape):
            return torch.nn.Parameter(torch.empty(*shape, dtype=torch.float32))

        self.ln_weight_AD, self.ln_bias_AD = param(num, hidden), param(num, hidden)
        self.down_ADH, self.down_bias_AH = param(num, hidden, width), param(num, width)
        self.up_AHD, self.up_bias_AD = param(num, width, hidden), param(num, hidden)

        # The task gate of the dynamic modes; shared_dynamic borrows the router's task table.
        self.gate_weight = None
        self.task_embedding = None
        self._shared_task_table = None
        if cfg.is_dynamic:
            self.gate_weight = param(num, hidden + cfg.task_embed_dim)
            if cfg.mode == "shared_dynamic":
                if shared_task_table is None:
                    raise ValueError("TaskAdapters: shared_dynamic needs the MoE router's task table")
                self._shared_task_table = shared_task_table
            else:
                self.task_embedding = param(self.num_rows, cfg.task_embed_dim)
        self.reset_parameters(dtype)

        self.collect_stats = False
        self.stats_assignments_GA: torch.Tensor | None = None
        self.stats_tokens_G: torch.Tensor | None = None
        # Training telemetry of the dynamic gates (routing_counts.RoutingCounters); `moe.set_routing_telemetry`.
        self.telemetry: RoutingCounters | None = None

    def reset_parameters(self, dtype: torch.dtype) -> None:
        with torch.no_grad():
            self.ln_weight_AD.fill_(1.0)
            self.ln_bias_AD.zero_()
            self.down_bias_AH.zero_()
            self.up_bias_AD.zero_()
            # A new adapter has no effect until trained: the up-projection starts at zero.
            self.up_AHD.zero_()
            if self.config.perform_initialization:
                for down_DH in self.down_ADH:
                    self.config.init_method(down_DH)
                if self.gate_weight is not None:
                    self.config.init_method(self.gate_weight)
                if self.task_embedding is not None:
                    torch.nn.init.normal_(self.task_embedding, mean=0.0, std=1.0)
        for p in self.parameters():
            p.data = p.data.to(dtype=dtype)
            setattr(p, "sequence_parallel", self.config.sequence_parallel)

    def task_table(self) -> torch.Tensor:
        if self._shared_task_table is not None:
            return self._shared_task_table()
        return self.task_embedding

    def choose(self, h_TD: torch.Tensor, ids_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter weights [T, A] and map [T, A] for each token."""
        if self.mode == "static":
            map_TA = F.one_hot(ids_T, self.num_adapters).bool()
            return map_TA.to(h_TD.dtype), map_TA
        task_emb_TC = self.task_table().index_select(0, ids_T).to(h_TD.dtype)
        gate_logits_TA = F.linear(torch.cat([h_TD, task_emb_TC], dim=-1), self.gate_weight.to(h_TD.dtype))
        return adapter_choice(gate_logits_TA, self.topk)

    def forward(self, h_LBD: torch.Tensor, padding_mask_LB: torch.Tensor | None = None) -> torch.Tensor:
        """h + sum of the chosen adapters' outputs, weighted; h is the MoE layer's output [L, B, D]."""
        local_len, batch, hidden = h_LBD.shape
        h_TD = h_LBD.reshape(-1, hidden)
        ids_T = self.task_context.token_ids(self.adapter_config.task_source, h_TD.shape[0], device=h_TD.device)
        # On CPU only: TaskContext checks ids once per micro-batch; here on a GPU it would synchronise per layer.
        if ids_T.device.type == "cpu" and ids_T.numel() and int(ids_T.max()) >= self.num_rows:
            raise ValueError(
                f"TaskAdapters({self.side}): id {int(ids_T.max())} outside the {self.num_rows} task rows "
                "(check MoEConfig.num_tasks / num_languages)"
            )
        weights_TA, map_TA = self.choose(h_TD, ids_T)
        out_TD = h_TD
        # The (adapter, token) pairs grouped by adapter, tokens ascending, with a single host synchronisation (for
        # the group sizes) however many adapters there are: static adapters are one per task.
        counts_A = map_TA.sum(dim=0).tolist()
        tokens_N = torch.nonzero_static(map_TA.T, size=sum(counts_A))[:, 1]
        for a, idx_N in enumerate(tokens_N.split(counts_A)):
            if idx_N.numel() == 0:
                continue
            delta_ND = bottleneck(
                h_TD.index_select(0, idx_N),
                self.ln_weight_AD[a],
                self.ln_bias_AD[a],
                self.down_ADH[a],
                self.down_bias_AH[a],
                self.up_AHD[a],
                self.up_bias_AD[a],
                self.eps,
            )
            out_TD = out_TD.index_add(0, idx_N, delta_ND * weights_TA.index_select(0, idx_N)[:, a : a + 1])
        training = self.training and torch.is_grad_enabled()
        if self.collect_stats or (training and self.telemetry is not None):
            self._record_stats(map_TA, padding_mask_LB, training)
        return out_TD.reshape(local_len, batch, hidden)

    def _record_stats(self, map_TA: torch.Tensor, padding_mask_LB: torch.Tensor | None, training: bool) -> None:
        """Validation statistics (`collect_stats`) and, in training, telemetry (`routing_counts.py`)."""
        if not self.task_context.has_ids("task"):
            return
        with torch.no_grad():
            ids_T = self.task_context.token_ids("task", map_TA.shape[0], device=map_TA.device)
            valid_T = None if padding_mask_LB is None else ~padding_mask_LB.reshape(-1).bool()
            if training and self.telemetry is not None:
                self.telemetry.add_adapters(map_TA, valid_T, ids_T)
            if self.collect_stats:
                if self.stats_assignments_GA is None:
                    self.init_stats(map_TA.device)
                add_task_counts_(self.stats_assignments_GA, self.stats_tokens_G, ids_T, map_TA, valid_T)

    def init_stats(self, device: torch.device) -> None:
        rows = self.moe_config.num_tasks
        self.stats_assignments_GA = torch.zeros(rows, self.num_adapters, dtype=torch.float64, device=device)
        self.stats_tokens_G = torch.zeros(rows, dtype=torch.float64, device=device)

    def reset_stats(self) -> None:
        self.stats_assignments_GA = None
        self.stats_tokens_G = None

    def init_telemetry(self, device: torch.device) -> None:
        self.telemetry = RoutingCounters("adapters", num_choices=self.num_adapters,
                                         num_task_rows=self.moe_config.num_tasks, device=device)
