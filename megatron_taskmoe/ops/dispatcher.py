"""megatron-core's token dispatchers with our permutation kernels in their permute/unpermute steps.

`TaskMoEAllGatherTokenDispatcher` and `TaskMoEAlltoAllTokenDispatcher` subclass megatron's
`MoEAllGatherTokenDispatcher` / `MoEAlltoAllTokenDispatcher` (same constructor, plus keyword-only
`permute_backend`) and override only the methods that call `moe_utils.permute` / `unpermute`; their bodies
follow megatron-core 0.16.1 line for line with our functions in place (and, in the all-gather dispatcher,
the permuted probabilities taken from our permute instead of a second masked_select). Communication, CUDA-stream
synchronization points and everything else stay megatron's (on CPU `megatron_taskmoe.compat` handles the latter). Where
later releases moved work between these methods, the release installed decides (`compat.moe`: the overlapped
shared experts' fc2 runs in megatron's `token_combine` from 0.18 on, so `combine_postprocess` leaves it out there).

`build_token_dispatcher(num_local_experts, local_expert_indices, config, pg_collection, backend=..., fast_path=...)`
picks the class from `config.moe_token_dispatcher_type`; `token_dispatcher_builder(backend, fast_path)` returns it
as the callable that `megatron_taskmoe.model.moe` takes as `token_dispatcher_builder`. `fast_path` says whether the
layer's routing can be the same for every token (task routing, or one expert per layer): only then does permute
look for it (on a GPU the check is a host synchronisation).

Legend: T tokens (local, or gathered over TP*EP for the all-gather dispatcher), H hidden size, E experts.
"""

import functools
from typing import Callable, List

import torch
from megatron.core.fusions.fused_pad_routing_map import fused_pad_routing_map
from megatron.core.config import is_experimental_enabled
from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization, pad_routing_map
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_taskmoe.compat.moe import shared_experts_run_in_token_comm
from megatron_taskmoe.ops.backend import BACKENDS
from megatron_taskmoe.ops.permute import permute, unpermute


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"permute_backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class TaskMoEAllGatherTokenDispatcher(MoEAllGatherTokenDispatcher):
    """All-gather dispatcher whose local permutation runs on megatron_taskmoe.ops kernels."""

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: List[int],
        config: TransformerConfig,
        pg_collection=None,
        *,
        permute_backend: str = "auto",
        fast_path: bool = True,
    ) -> None:
        super().__init__(num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection)
        self.permute_backend = _check_backend(permute_backend)
        self.fast_path = fast_path

    def dispatch_postprocess(self, hidden_states, probs):
        """Select the local experts' columns and group the gathered tokens by local expert."""
        self.hidden_shape_before_permute = hidden_states.shape
        first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        self.local_map = self.routing_map[:, first:last].contiguous()
        local_probs_TE = probs[:, first:last].contiguous()
        tokens_per_expert = self.local_map.sum(dim=0).long().cpu()
        permuted_hidden, self.local_probs, self.reversed_local_input_permutation_mapping = permute(
            hidden_states,
            self.local_map,
            probs=local_probs_TE,
            num_out_tokens=tokens_per_expert.sum(),
            backend=self.permute_backend,
            fast_path=self.fast_path,
        )
        self.routing_map = None
        return permuted_hidden, tokens_per_expert, self.local_probs

    def combine_preprocess(self, hidden_states):
        """Sum each token's expert outputs back into token order (probabilities were applied by the experts)."""
        return unpermute(
            hidden_states,
            self.reversed_local_input_permutation_mapping,
            restore_shape=self.hidden_shape_before_permute,
            routing_map=self.local_map,
            backend=self.permute_backend,
        )


class TaskMoEAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """All-to-all dispatcher whose permutation 1 / unpermutation 1 run on megatron_taskmoe.ops kernels."""

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: List[int],
        config: TransformerConfig,
        pg_collection=None,
        *,
        permute_backend: str = "auto",
        fast_path: bool = True,
    ) -> None:
        super().__init__(num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection)
        self.permute_backend = _check_backend(permute_backend)
        self.fast_path = fast_path
        # megatron-core 0.18+ runs the overlapped shared experts' fc2 in token_combine, before 0.18 here.
        self._shared_experts_in_token_comm = shared_experts_run_in_token_comm()

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """Communication metadata, then tokens and probabilities grouped by destination expert."""
        self.hidden_shape = hidden_states.shape
        self.probs = probs
        self.routing_map = routing_map
        if probs.dim() != 2 or routing_map.dim() != 2 or routing_map.dtype != torch.bool:
            raise ValueError("dispatch_preprocess expects 2-D probs and a 2-D bool routing map")
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])

        if self.config.moe_router_padding_for_quantization:
            pad_multiple = get_align_size_for_quantization(self.config)
            if is_experimental_enabled() and self.config.moe_permute_fusion:
                self.routing_map = fused_pad_routing_map(self.routing_map, pad_multiple)
            else:
                self.routing_map = pad_routing_map(self.routing_map, pad_multiple)
        self.tokens_per_expert = self.preprocess(self.routing_map)

        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))

        self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_1", self.tokens_per_expert)
        self.hidden_shape_before_permute = hidden_states.shape
        permuted_tokens, permuted_probs, self.reversed_local_input_permutation_mapping = permute(
            hidden_states,
            self.routing_map,
            probs=probs,
            num_out_tokens=self.num_out_tokens,
            drop_and_pad=self.drop_and_pad,
            backend=self.permute_backend,
            fast_path=self.fast_path,
        )
        return permuted_tokens, permuted_probs

    def combine_postprocess(self, permutated_local_input_tokens):
        """Tokens back in their original order and shape, plus the shared experts' output."""
        if self.shared_experts is not None and not self._shared_experts_in_token_comm:
            self.shared_experts.linear_fc2_forward(permutated_local_input_tokens)
            self.shared_experts.post_forward_comm()

        output = unpermute(
            permutated_local_input_tokens,
            self.reversed_local_input_permutation_mapping,
            restore_shape=self.hidden_shape_before_permute,
            routing_map=self.routing_map,
            drop_and_pad=self.drop_and_pad,
            backend=self.permute_backend,
        )
        output = output.view(self.hidden_shape)
        if self.shared_experts is not None:
            output += self.shared_experts.get_output()
        return output


DISPATCHER_CLASSES = {"allgather": TaskMoEAllGatherTokenDispatcher, "alltoall": TaskMoEAlltoAllTokenDispatcher}


def build_token_dispatcher(
    num_local_experts: int,
    local_expert_indices: List[int],
    config: TransformerConfig,
    pg_collection=None,
    *,
    backend: str = "auto",
    fast_path: bool = True,
):
    """Our dispatcher for `config.moe_token_dispatcher_type` ("allgather" or "alltoall")."""
    kind = config.moe_token_dispatcher_type
    if kind not in DISPATCHER_CLASSES:
        raise ValueError(
            f"moe_token_dispatcher_type={kind!r} has no megatron_taskmoe.ops dispatcher; "
            f"choose one of {sorted(DISPATCHER_CLASSES)}"
        )
    return DISPATCHER_CLASSES[kind](
        num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection,
        permute_backend=_check_backend(backend), fast_path=fast_path,
    )


def token_dispatcher_builder(backend: str = "auto", fast_path: bool = True) -> Callable[..., object]:
    """`build_token_dispatcher` with `backend` and `fast_path` bound: the `token_dispatcher_builder` of
    model/moe.py."""
    return functools.partial(build_token_dispatcher, backend=_check_backend(backend), fast_path=fast_path)

