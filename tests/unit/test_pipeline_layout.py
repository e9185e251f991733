"""The encoder-decoder pipeline's pure parts: which layers each stage holds, embedding groups, boundary shapes."""

import pytest

from megatron_taskmoe.model import presets
from megatron_taskmoe.model.config import ParallelConfig
from megatron_taskmoe.parallel import pipeline as P


def tiny(encoder_layers=4, decoder_layers=2):
    return presets.get("dense", "tiny", encoder_layers=encoder_layers, decoder_layers=decoder_layers)


def test_layout_splits_encoder_then_decoder():
    model, parallel = tiny(4, 2), ParallelConfig(pipeline=4, encoder_pipeline_stages=2)
    layouts = [P.stage_layout(model, parallel, s) for s in range(4)]
    assert [l.encoder_layers for l in layouts] == [(0, 1), (2, 3), None, None]
    assert [l.decoder_layers for l in layouts] == [None, None, (0,), (1,)]
    assert [l.pre_process for l in layouts] == [True, False, True, False]  # first encoder, first decoder stage
    assert [l.post_process for l in layouts] == [False, False, False, True]
    assert [l.is_first_decoder_stage for l in layouts] == [False, False, True, False]


def test_layout_without_pipelining_is_the_whole_model():
    layout = P.stage_layout(tiny(), ParallelConfig(), 0)
    assert layout.encoder_layers == (0, 1, 2, 3) and layout.decoder_layers == (0, 1)
    assert layout.pre_process and layout.post_process and not layout.is_first_decoder_stage


def test_layout_rejects_bad_splits():
    with pytest.raises(ValueError, match="encoder_pipeline_stages"):
        P.stage_layout(tiny(), ParallelConfig(pipeline=2), 0)
    with pytest.raises(ValueError, match="not divisible"):
        P.stage_layout(tiny(4, 2), ParallelConfig(pipeline=4, encoder_pipeline_stages=1), 0)
    with pytest.raises(ValueError, match="outside"):
        P.stage_layout(tiny(), ParallelConfig(pipeline=2, encoder_pipeline_stages=1), 2)


def test_boundary_shapes():
    model, parallel = tiny(2, 2), ParallelConfig(pipeline=4, encoder_pipeline_stages=2)
    shapes = [P.stage_tensor_shapes(P.stage_layout(model, parallel, s), src_len=9, tgt_len=5, micro_batch_size=3,
                                    hidden_size=32) for s in range(4)]
    enc, dec = (9, 3, 32), (5 + 9, 3, 32)
    assert shapes == [([enc], [enc]), ([enc], [enc]), ([enc], [dec]), ([dec], [dec])]
    # Sequence parallelism: each rank holds ceil(L / TP) positions of each side.
    layout = P.stage_layout(model, parallel, 3)
    assert P.stage_tensor_shapes(layout, src_len=9, tgt_len=5, micro_batch_size=3, hidden_size=32,
                                 tensor_parallel=2, sequence_parallel=True) == ([(3 + 5, 3, 32)], [(3 + 5, 3, 32)])
    assert P.local_length(9, 2, False) == 9 and P.local_length(9, 2, True) == 5 and P.local_length(8, 4, True) == 2


def test_static_shapes_refuse_a_micro_batch_of_another_length():
    import torch

    def batch(s, t):
        return {"src_tokens": torch.zeros(2, s, dtype=torch.long), "tgt_input": torch.zeros(2, t, dtype=torch.long)}

    checked = P._FixedShapeBatches(iter([batch(6, 4), batch(7, 4)]), micro_batch_size=2, src_len=6, tgt_len=4)
    assert next(checked)["src_tokens"].shape == (2, 6)
    with pytest.raises(ValueError, match=r"\(B, S, T\) = \(2, 7, 4\) differs from the static shapes \(2, 6, 4\)"):
        next(checked)
