"""Our GShard load-balancing loss against peer implementations on the same logits.

DeepSpeed's `top1gating` / `top2gating` (`l_aux`) is the reference the paper's own code used (Pham et al. build
on DeepSpeed); megatron's switch loss must agree for top-1 (for top-2 megatron counts both choices).

Legend: T tokens, E experts.
"""

import pytest
import torch

pytest.importorskip("deepspeed")
from deepspeed.moe.sharded_moe import top1gating, top2gating  # noqa: E402
from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func  # noqa: E402

from megatron_taskmoe.model import routing as R  # noqa: E402


def _logits(seed: int, num_tokens: int, num_experts: int) -> torch.Tensor:
    return torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed)) * 2.0


@pytest.mark.parametrize("seed,num_tokens,num_experts", [(0, 16, 4), (1, 37, 8), (2, 64, 3)])
def test_matches_deepspeed_top1(seed, num_tokens, num_experts):
    logits_TE = _logits(seed, num_tokens, num_experts)
    l_aux = top1gating(logits_TE.clone(), capacity_factor=1.0, min_capacity=1, use_rts=False)[0]
    torch.testing.assert_close(R.gshard_load_balancing_loss_from_logits(logits_TE), l_aux)


@pytest.mark.parametrize("seed,num_tokens,num_experts", [(3, 16, 4), (4, 37, 8), (5, 64, 3)])
def test_matches_deepspeed_top2(seed, num_tokens, num_experts):
    logits_TE = _logits(seed, num_tokens, num_experts)
    l_aux = top2gating(logits_TE.clone(), capacity_factor=1.0, min_capacity=1, top2_2nd_expert_sampling=False)[0]
    torch.testing.assert_close(R.gshard_load_balancing_loss_from_logits(logits_TE), l_aux)


def test_gradient_matches_deepspeed():
    logits_TE = _logits(6, 24, 4)
    ours = logits_TE.clone().requires_grad_(True)
    ref = logits_TE.clone().requires_grad_(True)
    R.gshard_load_balancing_loss_from_logits(ours).backward()
    top1gating(ref * 1.0, capacity_factor=1.0, min_capacity=1, use_rts=False)[0].backward()
    torch.testing.assert_close(ours.grad, ref.grad)


@pytest.mark.parametrize("gating", ["top1", "top2"])
def test_padding_excluded_equals_deepspeed_on_the_real_tokens(gating):
    """Excluding padding = DeepSpeed's loss on the real tokens alone (DeepSpeed's own `used_token` only masks
    the counts, not the mean probabilities, so the real-token subset is the reference)."""
    logits_TE = _logits(7, 30, 6)
    pad_T = torch.zeros(30, dtype=torch.bool)
    pad_T[[0, 5, 6, 7, 20, 29]] = True
    real = logits_TE[~pad_T].clone()
    if gating == "top1":
        l_aux = top1gating(real, capacity_factor=1.0, min_capacity=1, use_rts=False)[0]
    else:
        l_aux = top2gating(real, capacity_factor=1.0, min_capacity=1, top2_2nd_expert_sampling=False)[0]
    torch.testing.assert_close(R.gshard_load_balancing_loss_from_logits(logits_TE, pad_T), l_aux)
    # And the padding tokens' logits do not matter at all.
    scrambled = logits_TE.clone()
    scrambled[pad_T] = 100.0
    torch.testing.assert_close(R.gshard_load_balancing_loss_from_logits(scrambled, pad_T), l_aux)


def test_top1_equals_megatron_switch_loss():
    logits_TE = _logits(8, 40, 5)
    probs_TE, map_TE = R.topk_routing(logits_TE, 1)
    scores_TE = torch.softmax(logits_TE, -1)
    ref = switch_load_balancing_loss_func(
        probs=scores_TE,
        tokens_per_expert=map_TE.sum(0),
        total_num_tokens=40,
        topk=1,
        num_experts=5,
        moe_aux_loss_coeff=1.0,
    )
    torch.testing.assert_close(R.gshard_load_balancing_loss_from_logits(logits_TE), ref)
