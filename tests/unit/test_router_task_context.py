"""TaskContext: the explicit path of per-sequence ids to routers and adapters.

Legend: B batch, S length, L local length (sequence-parallel shard).
"""

import pytest
import torch

from megatron_taskmoe.model.task_context import TaskContext


def test_ids_expand_s_major_to_any_local_length():
    ctx = TaskContext()
    with ctx.micro_batch(task_ids_B=torch.tensor([4, 5, 6])):
        assert ctx.token_ids("task", 6).tolist() == [4, 5, 6, 4, 5, 6]  # t = s*B + b
        assert ctx.token_ids("task", 3).tolist() == [4, 5, 6]  # a sequence-parallel shard of one position
        with pytest.raises(ValueError, match="not a whole number"):
            ctx.token_ids("task", 4)


def test_cleared_after_the_block_even_on_error():
    ctx = TaskContext()
    with pytest.raises(KeyError):
        with ctx.micro_batch(task_ids_B=torch.tensor([1])):
            raise KeyError("boom")
    assert not ctx.active
    with pytest.raises(RuntimeError, match="outside a micro-batch"):
        ctx.ids("task")


def test_micro_batches_never_see_each_others_ids():
    ctx = TaskContext()
    seen = []
    for ids in (torch.tensor([0, 1]), torch.tensor([2, 2, 2])):
        with ctx.micro_batch(task_ids_B=ids):
            seen.append(ctx.token_ids("task", 2 * ids.numel()).tolist())
    assert seen == [[0, 1, 0, 1], [2, 2, 2, 2, 2, 2]]


def test_nested_micro_batches_are_refused():
    ctx = TaskContext()
    with ctx.micro_batch(task_ids_B=torch.tensor([0])):
        with pytest.raises(RuntimeError, match="already active"):
            with ctx.micro_batch(task_ids_B=torch.tensor([1])):
                pass
        assert ctx.ids("task").tolist() == [0]


def test_sources_and_missing_ids():
    ctx = TaskContext()
    with ctx.micro_batch(task_ids_B=torch.tensor([0, 1]), tgt_lang_ids_B=torch.tensor([3, 4])):
        assert ctx.ids("target_language").tolist() == [3, 4]
        assert ctx.has_ids("task") and not ctx.has_ids("source_language")
        with pytest.raises(RuntimeError, match="without source_language ids"):
            ctx.ids("source_language")
        with pytest.raises(ValueError, match="not one of"):
            ctx.ids("domain")


def test_bad_inputs_are_named():
    ctx = TaskContext()
    with pytest.raises(ValueError, match="tgt_lang_ids_B has 3 entries"):
        with ctx.micro_batch(task_ids_B=torch.tensor([0, 1]), tgt_lang_ids_B=torch.tensor([0, 1, 2])):
            pass
    with pytest.raises(ValueError, match="task_ids_B must be a 1-D integer"):
        with ctx.micro_batch(task_ids_B=torch.tensor([[0, 1]])):
            pass
    assert not ctx.active


def test_ids_are_range_checked_once_per_micro_batch():
    ctx = TaskContext(id_limits={"task": 3, "target_language": 2})
    with ctx.micro_batch(task_ids_B=torch.tensor([0, 2]), tgt_lang_ids_B=torch.tensor([1, 0])):
        assert ctx.ids("task").tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"task_ids_B has ids in \[0, 3\], outside the model's 3 rows"):
        with ctx.micro_batch(task_ids_B=torch.tensor([0, 3])):
            pytest.fail("micro_batch accepted a task id beyond the model's rows")
    with pytest.raises(ValueError, match=r"tgt_lang_ids_B has ids in \[-1, 0\]"):
        with ctx.micro_batch(task_ids_B=torch.tensor([0, 1]), tgt_lang_ids_B=torch.tensor([-1, 0])):
            pytest.fail("micro_batch accepted a negative language id")
    assert not ctx.active
    with ctx.micro_batch(src_lang_ids_B=torch.tensor([7])):  # no limit given for this source
        assert ctx.ids("source_language").tolist() == [7]
    with pytest.raises(ValueError, match="unknown sources"):
        TaskContext(id_limits={"domain": 2})


def test_single_id_of_a_micro_batch():
    ctx = TaskContext()
    with ctx.micro_batch(task_ids_B=torch.tensor([2, 2, 2]), tgt_lang_ids_B=torch.tensor([1, 0, 1])):
        assert ctx.single_id("task") == 2
        assert ctx.single_id("target_language") is None
        with pytest.raises(RuntimeError, match="without source_language ids"):
            ctx.single_id("source_language")
    with ctx.micro_batch(task_ids_B=torch.tensor([0, 1])):
        assert ctx.single_id("task") is None  # looked up again: nothing kept from the last micro-batch
    with ctx.micro_batch(task_ids_B=torch.zeros(0, dtype=torch.long)):
        assert ctx.single_id("task") is None
    with pytest.raises(RuntimeError, match="outside a micro-batch"):
        ctx.single_id("task")


def test_padding_mask_per_side_and_sequence_parallel_slices():
    ctx = TaskContext()
    src_BS = torch.tensor([[False, False, False, True], [False, True, True, True]])
    tgt_BT = torch.tensor([[False, True], [False, False]])
    with ctx.micro_batch(task_ids_B=torch.tensor([0, 1]), src_padding_mask_BS=src_BS, tgt_padding_mask_BT=tgt_BT):
        assert torch.equal(ctx.padding_mask("encoder", 4), src_BS.T)
        assert torch.equal(ctx.padding_mask("decoder", 2), tgt_BT.T)
        # TP=2 with sequence parallelism: rank r holds positions [2r, 2r+2) of every sequence.
        assert torch.equal(ctx.padding_mask("encoder", 2, tp_rank=1, tp_size=2, sequence_parallel=True), src_BS[:, 2:].T)
        with pytest.raises(ValueError, match="covers 4 positions"):
            ctx.padding_mask("encoder", 3)
    with ctx.micro_batch(task_ids_B=torch.tensor([0, 1])):
        assert ctx.padding_mask("encoder", 4) is None
