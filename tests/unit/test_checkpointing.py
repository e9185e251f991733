import json
import random

import numpy as np
import pytest
import torch

from megatron_taskmoe.checkpoint.manager import (
    CheckpointManager,
    latest_checkpoint,
    list_checkpoints,
    load_rank_state,
    resolve_checkpoint,
)
from megatron_taskmoe.checkpoint.record import CheckpointRecord
from megatron_taskmoe.checkpoint.rng import capture_rng_state, restore_rng_state


def _writer(value):
    def save_fn(directory):
        torch.save({"w": torch.full((3,), float(value))}, directory / "model.pt")

    return save_fn


def test_save_list_latest_and_rank_state(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5, keep_best=0)
    for step in (10, 20):
        mgr.save(CheckpointRecord(step=step, tokenizer_sha256="ab"), _writer(step), rank_state={"step": step})
    infos = list_checkpoints(tmp_path)
    assert [i.step for i in infos] == [10, 20]
    latest = latest_checkpoint(tmp_path)
    assert latest.step == 20 and latest.meta["tokenizer_sha256"] == "ab"
    assert torch.load(latest.path / "model.pt")["w"][0].item() == 20.0
    assert load_rank_state(latest.path) == {"step": 20}
    assert load_rank_state(latest.path, rank=3) is None


def test_the_tokenizer_is_part_of_the_complete_checkpoint(tmp_path):
    tokenizer = tmp_path / "spm.model"
    tokenizer.write_bytes(b"sentencepiece bytes")
    path = CheckpointManager(tmp_path / "ckpt").save(CheckpointRecord(step=3), _writer(3), tokenizer=tokenizer)
    assert (path / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
    assert json.loads((path / "checkpoint.json").read_text()) == {"step": 3, "metric": None}


def test_crash_during_save_leaves_previous_checkpoint_and_is_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_best=0)
    mgr.save(CheckpointRecord(step=10), _writer(10))

    def crashing(directory):
        (directory / "half_written.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="mid-save"):
        mgr.save(CheckpointRecord(step=20), crashing)
    assert [i.step for i in list_checkpoints(tmp_path)] == [10]
    assert latest_checkpoint(tmp_path).step == 10
    assert resolve_checkpoint(tmp_path).step == 10
    assert any(p.name.startswith(".partial.") for p in tmp_path.iterdir())
    # The next save clears the stale partial directory.
    mgr.save(CheckpointRecord(step=30), _writer(30))
    assert not any(p.name.startswith(".partial.") for p in tmp_path.iterdir())
    assert [i.step for i in list_checkpoints(tmp_path)] == [10, 30]


def test_a_directory_without_marker_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step_00000050").mkdir()
    (tmp_path / "latest").write_text("step_00000050\n")
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path)


def test_retention_keeps_last_k_and_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_best=1)
    bleu = {1: 5.0, 2: 9.0, 3: 7.0, 4: 6.0, 5: 1.0}
    for step, metric in bleu.items():
        mgr.save(CheckpointRecord(step=step, metric=metric), _writer(step))
    assert [i.step for i in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert mgr.best().step == 2


def test_rng_state_roundtrip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
