"""The forward step of training and validation: megatron-core's `forward_step_func` and its loss function.

Legend: B sentences in a micro-batch, T target length.

A micro-batch is a collated batch already on the device (`data.batching.to_device`). The model returns the
label-smoothed token losses [B, T]; the loss function sums them over the target tokens (`loss_mask`) and reports the
sum with the token count, which megatron-core divides by under `calculate_per_token_loss=True` (set in setup.py).
The training loop hands the step to megatron's schedules; the validator runs it forward-only, through the pipeline
schedule or directly (`run_forward_step`), so training and validation compute the loss the same way.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from megatron_taskmoe.data.batching import model_inputs

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
ForwardStep = Callable[[Iterator[dict], torch.nn.Module], tuple[torch.Tensor, LossFunc]]


def token_loss_func(loss_mask_BT: torch.Tensor) -> LossFunc:
    """The loss function of a micro-batch: (sum of the masked token losses, token count, `{"lm loss": [sum,
    count]}` for the step's report)."""

    def loss_func(output_BT: torch.Tensor):
        loss_sum = (output_BT.float() * loss_mask_BT).sum()
        num_tokens = loss_mask_BT.sum().to(torch.int)
        return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

    return loss_func


def make_forward_step(label_smoothing: Optional[float] = None) -> ForwardStep:
    """megatron-core's forward_step_func: runs the model on the next micro-batch and returns its loss function.
    `label_smoothing` replaces the model's (0.0 for the plain NLL)."""

    def forward_step(data_iterator: Iterator[dict], model):
        batch = next(data_iterator)
        loss_BT = model(**model_inputs(batch), label_smoothing=label_smoothing)
        return loss_BT, token_loss_func(batch["loss_mask"])

    return forward_step


def run_forward_step(forward_step: ForwardStep, model: torch.nn.Module, batch: dict) -> tuple[float, float]:
    """(loss sum, token count) of one micro-batch on the device, without a schedule (no pipelining)."""
    output_BT, loss_func = forward_step(iter([batch]), model)
    loss_sum, num_tokens, _ = loss_func(output_BT)
    return float(loss_sum), float(num_tokens)
