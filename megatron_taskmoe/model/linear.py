"""megatron-core's column/row-parallel linears with an inference path that skips their autograd wrappers.

With gradients enabled these are megatron's `ColumnParallelLinear` / `RowParallelLinear` unchanged. With gradients
disabled (decoding, validation) and no sequence parallelism, the forward is what megatron's computes, with the same
operations in the same order (`matmul(input, weight.t())`, which is what `F.linear` runs without a bias, then
`+ bias`; a row-parallel layer all-reduces its partial output over its tensor-parallel group unless the experts'
explicit communication does it), so the results are bit for bit the same, but without megatron's per-call
autograd functions, process-group lookups and environment reads. A one-token decoding step is a handful of tiny
matmuls, where that bookkeeping cost several times the arithmetic (about 60 us per call on a CPU core, against
10 us for the matmul of a d-128 layer). Sequence parallelism (which needs gathers and reduce-scatters along the
sequence) and the other megatron options (`gather_output`, deferred embedding gradients) keep megatron's forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import layers


class ColumnParallelLinear(layers.ColumnParallelLinear):
    """megatron's `ColumnParallelLinear` (output columns split over tensor-parallel ranks); fast without grad."""

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if (torch.is_grad_enabled() or self.sequence_parallel or gather
                or self.config.defer_embedding_wgrad_compute):
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        weight = self.weight if weight is None else weight
        output = F.linear(input_, weight)
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        return output, (self.bias if self.skip_bias_add else None)


class RowParallelLinear(layers.RowParallelLinear):
    """megatron's `RowParallelLinear` (input rows split over tensor-parallel ranks); fast without grad."""

    def forward(self, input_: torch.Tensor):
        if torch.is_grad_enabled() or self.sequence_parallel or not self.input_is_parallel:
            return super().forward(input_)
        output = F.linear(input_, self.weight)
        if not self.explicit_expert_comm and self.tp_group is not None and self.tp_group.size() > 1:
            dist.all_reduce(output, group=self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None
