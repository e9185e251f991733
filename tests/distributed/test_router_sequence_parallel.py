"""TaskTopKRouter under tensor parallelism with sequence parallelism (TP=2, gloo) equals the single-process router.

Each rank routes its S/2 positions of every sequence. The routing decisions, the probabilities, the input
gradients and the (all-reduced) parameter gradients must equal the single-process router's on the full sequence,
for every mode, with padding, the GShard loss and the z-loss on: this is what makes sentence routing's masked
mean (an autograd all-reduce) and the loss decomposition exact.

Legend: S length, L = S/TP local length, B batch, D model dim, T tokens, E experts.
"""

import pytest
import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from tests.helpers import harness as H
from megatron_taskmoe.model.moe_config import MoEConfig, RoutingConfig
from megatron_taskmoe.model.router import TaskTopKRouter
from megatron_taskmoe.model.task_context import TaskContext

pytestmark = pytest.mark.distributed

S, B, D, E = 6, 3, 8, 4
MODES = ("token", "sentence", "task", "task_token")


def _router(mode, tp_group, sequence_parallel):
    routing = RoutingConfig(mode=mode, task_embed_dim=4)
    moe = MoEConfig(num_experts=E, topk=2, z_loss_coeff=1e-2, num_tasks=3, num_languages=3, encoder=routing, decoder=routing)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=D,
        num_attention_heads=2,
        use_cpu_initialization=True,
        sequence_parallel=sequence_parallel,
        add_bias_linear=False,
        tensor_model_parallel_size=2 if sequence_parallel else 1,
        **moe.megatron_kwargs(),
    )
    groups = ProcessGroupCollection(tp=tp_group, cp=None, tp_cp=tp_group, tp_dp_cp=tp_group)
    ctx = TaskContext()
    torch.manual_seed(0)
    return TaskTopKRouter(config, groups, moe_config=moe, side="encoder", task_context=ctx), ctx


def _run(router, ctx, x_SBD, pad_BS, weights_TE, tasks_B):
    with ctx.micro_batch(task_ids_B=tasks_B, src_padding_mask_BS=pad_BS):
        probs_TE, map_TE = router(x_SBD, padding_mask=pad_BS.T)
    (probs_TE * weights_TE).sum().backward()
    return probs_TE.detach(), map_TE


def _worker(rank, world_size):
    world = dist.group.WORLD
    g = torch.Generator().manual_seed(7)
    x_SBD = torch.randn(S, B, D, generator=g)
    pad_BS = torch.zeros(B, S, dtype=torch.bool)
    pad_BS[1, 2:] = True  # sentence 1 has no real token on rank 1
    pad_BS[2, 5:] = True
    weights_TE = torch.randn(S * B, E, generator=g)
    tasks_B = torch.tensor([2, 0, 2])
    local = slice(rank * (S // 2), (rank + 1) * (S // 2))
    tokens = slice(rank * (S // 2) * B, (rank + 1) * (S // 2) * B)
    for mode in MODES:
        ref, ref_ctx = _router(mode, None, False)
        sp, sp_ctx = _router(mode, world, True)
        sp.load_state_dict(ref.state_dict())
        x_ref = x_SBD.clone().requires_grad_(True)
        x_loc = x_SBD[local].clone().requires_grad_(True)
        ref_probs, ref_map = _run(ref, ref_ctx, x_ref, pad_BS, weights_TE, tasks_B)
        # The SP router is given megatron's full-length mask [S, B]: it must slice its own positions.
        sp_probs, sp_map = _run(sp, sp_ctx, x_loc, pad_BS, weights_TE[tokens], tasks_B)
        assert torch.equal(sp_map, ref_map[tokens]), mode
        torch.testing.assert_close(sp_probs, ref_probs[tokens], atol=H.TOL, rtol=0)
        if mode != "task":
            torch.testing.assert_close(x_loc.grad, x_ref.grad[local], atol=H.TOL, rtol=0, msg=mode)
        for name, param in sp.named_parameters():
            grad = param.grad.clone()
            assert getattr(param, "sequence_parallel") is True, name
            dist.all_reduce(grad)  # what finalize_model_grads does for `sequence_parallel` parameters
            ref_grad = dict(ref.named_parameters())[name].grad
            torch.testing.assert_close(grad, ref_grad, atol=H.TOL, rtol=0, msg=f"{mode} {name}")
        for attr in ("last_aux_loss", "last_z_loss"):
            part = getattr(sp, attr).clone()
            dist.all_reduce(part)
            torch.testing.assert_close(part, getattr(ref, attr), atol=H.TOL, rtol=0, msg=f"{mode} {attr}")


def test_sequence_parallel_router_equals_single_process(tmp_path):
    H.spawn(_worker, 2, tmp_dir=str(tmp_path))
