"""Which of our token dispatchers look for uniform routing (their fast path), on models built with a one-process
group; the dispatchers themselves against megatron-core's: tests/unit/test_permute_dispatcher.py."""

from megatron_taskmoe.parallel import groups
from megatron_taskmoe.ops.dispatcher import TaskMoEAllGatherTokenDispatcher, TaskMoEAlltoAllTokenDispatcher


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
            groups.destroy()
