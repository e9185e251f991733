"""convert: a checkpoint trained by pretrain_mt.py, resharded offline to other layouts, computes the same logits.

TP1 -> TP2 and TP1 -> EP2 (model + optimizer + schedule), each run IN its layout on 2 gloo processes; EP2 -> one
safetensors file -> a TP1 trainer checkpoint, run in one process. Every comparison is against the source model's
logits on one fixed batch, within 1e-5 (fp32).
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.corpus import run_tool

pytestmark = pytest.mark.distributed
TOL = 1e-5


def _train(data_dir, run_dir, steps: int = 4):
    r = run_tool("pretrain_mt.py", "--config", "examples/configs/tiny_cpu.yaml", "--set", f"data.data_dir={data_dir}",
                 "--set", f"train.run_dir={run_dir}", "--set", f"train.steps={steps}", "--set", "eval.interval=0",
                 "--set", "train.progress_bar=false", "--set", "optim.warmup_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir / "checkpoints"


def test_convert_to_other_layouts_keeps_logits(bible_data, tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_taskmoe.checkpoint_tools import verify
    from megatron_taskmoe.checkpoint_tools.full import isclose_state
    from megatron_taskmoe.checkpoint_tools.layout_jobs import logits_in_layout
    from megatron_taskmoe.checkpoint_tools.layouts import parse_layout
    from megatron_taskmoe.checkpoint_tools.reading import read_checkpoint, read_info_parallel
    from megatron_taskmoe.checkpoint_tools.single_file import read_single_file, write_single_file
    from megatron_taskmoe.checkpoint_tools.trainer_checkpoints import (convert_trainer_checkpoint_many,
                                                                       write_trainer_checkpoint)
    from megatron_taskmoe.parallel import groups

    source = _train(bible_data, tmp_path / "run")
    tp2, ep2 = parse_layout(tensor=2), parse_layout(expert=2)
    out_tp2, out_ep2 = tmp_path / "tp2", tmp_path / "ep2"
    try:
        convert_trainer_checkpoint_many(source, [(out_tp2, tp2), (out_ep2, ep2)])
        reference = read_checkpoint(source)
        batch = verify.fixed_batch(reference.model_config())
        logits_ref = verify.checkpoint_logits(reference, batch)
        assert logits_ref.abs().max() > 0

        logits_tp2, logits_ep2 = logits_in_layout([(out_tp2, tp2), (out_ep2, ep2)], batch)
        assert (logits_tp2 - logits_ref).abs().max() <= TOL
        assert (logits_ep2 - logits_ref).abs().max() <= TOL
        # The optimizer state and counters travelled (a resume continues the run).
        common = dist_checkpointing.load_common_state_dict(str(out_tp2))
        assert common["train_state"]["step"] == 4
        assert read_info_parallel(out_ep2)["expert"] == 2
        record = lambda d: json.loads((d / "checkpoint.json").read_text())["converted_from"]  # noqa: E731
        assert record(out_tp2)["optimizer_state"] == "kept"
        # Expert weights have their own chained optimizer under every layout: the moments reshard across EP too.
        assert record(out_ep2)["optimizer_state"] == "kept"

        single = tmp_path / "ep2.safetensors"
        write_single_file(read_checkpoint(out_ep2), single)
        from_single = read_single_file(single)
        assert isclose_state(from_single.state, reference.state) == 0.0
        assert from_single.tokenizer == (source / "latest").parent.joinpath(
            (source / "latest").read_text().strip(), "tokenizer.model").read_bytes()
        back = write_trainer_checkpoint(from_single, tmp_path / "tp1", parse_layout())
        assert (verify.checkpoint_logits(read_checkpoint(back), batch) - logits_ref).abs().max() <= TOL
    finally:
        groups.destroy()
    assert not list(tmp_path.glob(".partial.*"))
