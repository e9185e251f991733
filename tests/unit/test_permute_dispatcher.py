"""Our token dispatchers against megatron-core's at world size 1: same expert inputs, outputs and gradients.

Each dispatcher runs the full dispatch -> experts -> combine sequence (the communication steps are identities at
world size 1); the experts are a fixed per-row scale applied with the permuted probabilities, as megatron's
experts do. CUDA-only details of megatron's all-to-all dispatcher are handled by megatron_taskmoe.platform.

Legend: S sequence, B batch, H hidden size, E experts, N permuted rows.
"""

import pytest
import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_taskmoe import platform
from megatron_taskmoe.ops.dispatcher import (
    TaskMoEAllGatherTokenDispatcher,
    TaskMoEAlltoAllTokenDispatcher,
    build_token_dispatcher,
    token_dispatcher_builder,
)
from permute_reference import tolerances, topk_routing

S, B, H, E = 7, 3, 16, 4


@pytest.fixture(scope="module", autouse=True)
def _cpu_platform():
    platform.apply()


def make_config(kind: str, topk: int, capacity_factor=None) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=2,
        num_moe_experts=E,
        moe_router_topk=topk,
        moe_token_dispatcher_type=kind,
        moe_expert_capacity_factor=capacity_factor,
        moe_pad_expert_input_to_capacity=capacity_factor is not None,
        moe_router_pre_softmax=topk == 1,
        add_bias_linear=False,
        use_cpu_initialization=True,
    )


def world_size_one_groups() -> ProcessGroupCollection:
    pgs = ProcessGroupCollection()
    pgs.ep = None
    pgs.expt_tp = None
    pgs.tp_ep = None
    return pgs


def run_layer(dispatcher, hidden_SBH, routing_map_TE, probs_TE):
    """dispatch -> 'experts' (row scale times permuted prob) -> combine; returns output and the expert inputs.

    The all-to-all dispatcher's communication steps need a process group even at world size 1, where they are
    identities: they are skipped (its device-to-host step still runs)."""
    all_to_all = isinstance(dispatcher, MoEAlltoAllTokenDispatcher)
    x, p = dispatcher.dispatch_preprocess(hidden_SBH, routing_map_TE, probs_TE)
    if all_to_all:
        dispatcher.tokens_per_expert = dispatcher._maybe_dtoh_and_synchronize(
            "before_ep_alltoall", dispatcher.tokens_per_expert
        )
    else:
        x, p = dispatcher.token_dispatch(x, p)
    expert_in_NH, tokens_per_expert, p_N = dispatcher.dispatch_postprocess(x, p)
    scale_N1 = torch.linspace(0.5, 1.5, expert_in_NH.shape[0], dtype=expert_in_NH.dtype).unsqueeze(1)
    expert_out_NH = expert_in_NH * scale_N1 * p_N.unsqueeze(1).to(expert_in_NH.dtype)
    y = dispatcher.combine_preprocess(expert_out_NH)
    if not all_to_all:
        y = dispatcher.token_combine(y)
    return dispatcher.combine_postprocess(y), expert_in_NH.detach(), tokens_per_expert, p_N.detach()


@pytest.mark.parametrize(
    "kind,ours_cls,theirs_cls,capacity_factor",
    [
        ("allgather", TaskMoEAllGatherTokenDispatcher, MoEAllGatherTokenDispatcher, None),
        ("alltoall", TaskMoEAlltoAllTokenDispatcher, MoEAlltoAllTokenDispatcher, None),
        # megatron's all-gather dispatcher has no drop-and-pad mode
        ("alltoall", TaskMoEAlltoAllTokenDispatcher, MoEAlltoAllTokenDispatcher, 1.0),
    ],
    ids=["allgather", "alltoall", "alltoall-pad"],
)
@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dispatcher_matches_megatron(kind, ours_cls, theirs_cls, capacity_factor, topk, dtype):
    config = make_config(kind, topk, capacity_factor)
    routing_map_TE, probs_TE = topk_routing(S * B, E, topk, seed=topk)
    hidden_SBH = torch.randn(S, B, H, generator=torch.Generator().manual_seed(3)).to(dtype)
    grad_SBH = torch.randn(S, B, H, generator=torch.Generator().manual_seed(4)).to(dtype)
    results = []
    for cls in (theirs_cls, ours_cls):
        dispatcher = cls(E, list(range(E)), config=config, pg_collection=world_size_one_groups())
        x_SBH = hidden_SBH.clone().requires_grad_()
        p_TE = probs_TE.clone().requires_grad_()
        out_SBH, expert_in_NH, tokens_per_expert, p_N = run_layer(dispatcher, x_SBH, routing_map_TE, p_TE)
        (out_SBH.float() * grad_SBH.float()).sum().backward()
        results.append((out_SBH.detach(), expert_in_NH, tokens_per_expert, p_N, x_SBH.grad, p_TE.grad))
    theirs, ours = results
    assert torch.equal(theirs[1], ours[1]), "expert inputs differ"
    assert torch.equal(theirs[2], ours[2]) and torch.equal(theirs[3], ours[3])
    tol = tolerances(dtype)
    assert ours[0].shape == (S, B, H) and ours[0].dtype == dtype
    for a, b in zip(ours[:1] + ours[4:], theirs[:1] + theirs[4:]):
        torch.testing.assert_close(a, b, **tol)


def test_build_token_dispatcher_selects_class_and_backend():
    for kind, cls in (("allgather", TaskMoEAllGatherTokenDispatcher), ("alltoall", TaskMoEAlltoAllTokenDispatcher)):
        dispatcher = build_token_dispatcher(
            2, [0, 1], make_config(kind, 1), world_size_one_groups(), backend="torch"
        )
        assert type(dispatcher) is cls and dispatcher.permute_backend == "torch"
    builder = token_dispatcher_builder("extension")
    dispatcher = builder(E, list(range(E)), config=make_config("alltoall", 2), pg_collection=world_size_one_groups())
    assert dispatcher.permute_backend == "extension"
    with pytest.raises(ValueError, match="permute_backend must be one of"):
        token_dispatcher_builder("fast")
    with pytest.raises(ValueError, match="has no megatron_taskmoe.ops dispatcher"):
        build_token_dispatcher(E, list(range(E)), make_config("flex", 1), world_size_one_groups())


def test_fast_path_only_where_routing_can_be_uniform():
    # The uniform-routing check is a host synchronisation on a GPU: dispatchers look for it only on sides routed
    # by task or with as many experts as each token picks (one expert: every token takes it).
    import torch.distributed as dist

    from megatron_taskmoe.checkpoint_tools.models import build_model
    from megatron_taskmoe.model import presets

    had_group = dist.is_initialized()
    try:
        for system, expected in (("token_enc_task_dec", {"encoder": {False}, "decoder": {True}}),
                                 ("moe_token", {"encoder": {False}, "decoder": {False}}),
                                 ("dense_task_static", {"encoder": {True}, "decoder": {True}})):
            model = build_model(presets.get(system, "tiny"))
            flags = {side: {m.token_dispatcher.fast_path for name, m in model.named_modules()
                            if name.startswith(side) and isinstance(getattr(m, "token_dispatcher", None),
                                                                   (TaskMoEAllGatherTokenDispatcher,
                                                                    TaskMoEAlltoAllTokenDispatcher))}
                     for side in ("encoder", "decoder")}
            assert flags == expected, system
    finally:
        if not had_group and dist.is_initialized():
            platform.destroy()
