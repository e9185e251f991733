"""pretrain_mt.py end to end on real data (Bible en<->de, en<->fr): learning, BLEU per task, exact resume, resume
under other parallel sizes, crash-safe checkpoints, SIGTERM, NaN handling. Runs the script itself, under torchrun
with gloo where the test needs several processes."""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.corpus import PY, ROOT, run_tool, torchrun

pytestmark = pytest.mark.distributed

CONFIG = "examples/configs/tiny_cpu.yaml"


def _args(data_dir, run_dir, *overrides):
    base = [f"data.data_dir={data_dir}", f"train.run_dir={run_dir}", "train.progress_bar=false",
            "train.log_interval=1"]
    return ["pretrain_mt.py", "--config", CONFIG, *[x for o in (*base, *overrides) for x in ("--set", o)]]


def _losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def _evals(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "eval"]


def _ok(r):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])


def test_loss_decreases_and_bleu_per_task(tmp_path, bible_data):
    run = tmp_path / "run"
    _ok(run_tool(*_args(bible_data, run, "train.steps=60", "eval.interval=60", "eval.max_sentences=16",
                        "optim.lr=3e-3", "optim.warmup_steps=10")))
    losses = _losses(run)
    first = sum(losses[s] for s in range(1, 11)) / 10
    last = sum(losses[s] for s in range(51, 61)) / 10
    assert last < first - 0.5, (first, last)  # about 6.7 -> 5.9 here
    (ev,) = _evals(run)
    assert set(ev["bleu"]) == {"de-en", "en-de", "en-fr", "fr-en"}
    assert all(0.0 <= b <= 100.0 for b in ev["bleu"].values())
    assert set(ev["loss"]) == set(ev["bleu"]) and ev["bleu_avg"] == pytest.approx(sum(ev["bleu"].values()) / 4)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").is_file()
    assert any((run / "tensorboard").iterdir())


def test_exact_resume_with_dropout(tmp_path, bible_data):
    common = ("eval.interval=0", "checkpoint.interval=4", "model.overrides.dropout=0.1",
              "model.overrides.attention_dropout=0.1")
    full, split = tmp_path / "full", tmp_path / "split"
    _ok(run_tool(*_args(bible_data, full, "train.steps=8", *common)))
    _ok(run_tool(*_args(bible_data, split, "train.steps=4", *common)))
    _ok(run_tool(*_args(bible_data, split, "train.steps=8", *common)))
    a, b = _losses(full), _losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise: same batches, dropout masks, optimizer state


def test_resume_under_other_tensor_parallel_size(tmp_path, bible_data):
    """Save under TP=2 on 2 gloo ranks, resume under TP=1 in one process: the next step's loss matches."""
    common = ("eval.interval=0", "checkpoint.interval=3")
    ref = tmp_path / "ref"
    _ok(torchrun(2, *_args(bible_data, ref, "train.steps=4", *common, "parallel.tensor=2")))
    other = tmp_path / "other"
    _ok(run_tool(*_args(bible_data, other, "train.steps=4", *common, "parallel.tensor=1",
                        f"checkpoint.load={ref / 'checkpoints' / 'step_00000003'}")))
    a, b = _losses(ref), _losses(other)
    assert sorted(b) == [4]
    assert b[4] == pytest.approx(a[4], abs=1e-5), (a, b)


def test_resume_across_expert_parallel_sizes_keeps_adam_moments(tmp_path, bible_data):
    """EP=2 -> EP=1 -> EP=2, each resume continuing exactly as the run it left (2 gloo ranks throughout, so only
    the expert-parallel size changes, not the data-parallel batches).

    The first step after a resume checks the weights; the second checks the optimizer too, its update having used
    the restored Adam moments. Measured: the losses are bitwise equal; with the moments restarted (as before expert
    weights had their own optimizer at EP=1) step 4's loss is off by 1.8e-4."""
    common = ("eval.interval=0", "checkpoint.interval=2")
    a, b, c = tmp_path / "ep2", tmp_path / "ep1", tmp_path / "ep2_again"
    _ok(torchrun(2, *_args(bible_data, a, "train.steps=4", *common, "parallel.expert=2")))
    _ok(torchrun(2, *_args(bible_data, b, "train.steps=6", *common, "parallel.expert=1",
                           f"checkpoint.load={a / 'checkpoints' / 'step_00000002'}")))
    _ok(torchrun(2, *_args(bible_data, c, "train.steps=6", *common, "parallel.expert=2",
                           f"checkpoint.load={b / 'checkpoints' / 'step_00000004'}")))
    la, lb, lc = _losses(a), _losses(b), _losses(c)
    assert sorted(lb) == [3, 4, 5, 6] and sorted(lc) == [5, 6]
    for step in (3, 4):  # EP=2 -> EP=1
        assert lb[step] == pytest.approx(la[step], abs=1e-5), (step, la, lb)
    for step in (5, 6):  # EP=1 -> EP=2
        assert lc[step] == pytest.approx(lb[step], abs=1e-5), (step, lb, lc)


CRASHING_SAVE = """
import os, sys
sys.argv = sys.argv[1:]
from megatron.core import dist_checkpointing
real_save, calls = dist_checkpointing.save, []
def save(sharded, directory, *a, **k):
    calls.append(directory)
    if len(calls) == 2:  # the second save dies half-way: some files written, then the process is gone
        real_save(sharded, directory, *a, **k)
        os._exit(17)
    return real_save(sharded, directory, *a, **k)
dist_checkpointing.save = save
import runpy
runpy.run_path("pretrain_mt.py", run_name="__main__")
"""


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, bible_data):
    run = tmp_path / "run"
    common = ("eval.interval=0", "checkpoint.interval=2")
    # The dying process leaves megatron's checkpoint worker processes behind: run it in its own session, wait for
    # it alone, then end the whole group (output goes to files so no pipe is held open by the orphans).
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "crash.log", "w") as log:
        proc = subprocess.Popen([PY, "-c", CRASHING_SAVE, *_args(bible_data, run, "train.steps=6", *common)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert returncode == 17, (tmp_path / "crash.log").read_text()[-3000:]
    ckpts = run / "checkpoints"
    assert (ckpts / "step_00000002" / "checkpoint.json").is_file()
    assert any(p.name.startswith(".partial.step_00000004") for p in ckpts.iterdir())
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    # A rerun resumes from step 2, ignores (and clears) the partial save, and finishes.
    _ok(run_tool(*_args(bible_data, run, "train.steps=6", *common)))
    assert not any(p.name.startswith(".partial.") for p in ckpts.iterdir())
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    assert sorted(_losses(run)) == list(range(1, 7))


def test_sigterm_saves_and_stops(tmp_path, bible_data):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PY, *_args(bible_data, run, "train.steps=100000", "eval.interval=0",
                                        "checkpoint.interval=100000")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and len(_losses(run)) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    last = max(_losses(run))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"


NAN_AT_STEP_3 = """
import sys, torch
sys.argv = sys.argv[1:]
from megatron_taskmoe.model.encdec import EncoderDecoderModel
real_forward, calls = EncoderDecoderModel.forward, []
def forward(self, *a, **k):
    out = real_forward(self, *a, **k)
    calls.append(1)
    return out * float("nan") if len(calls) == 3 else out
EncoderDecoderModel.forward = forward
import runpy
runpy.run_path("pretrain_mt.py", run_name="__main__")
"""


def test_nan_loss_stops_naming_the_step_or_is_skipped(tmp_path, bible_data):
    common = ("eval.interval=0", "checkpoint.save=false", "train.steps=5")
    r = run_tool("-c", NAN_AT_STEP_3, *_args(bible_data, tmp_path / "stop", *common))
    assert r.returncode == 3 and "loss is nan at step 3" in r.stderr, r.stderr[-2000:]
    r = run_tool("-c", NAN_AT_STEP_3, *_args(bible_data, tmp_path / "skip", *common, "train.nan_policy=skip"))
    _ok(r)
    losses = _losses(tmp_path / "skip")
    assert sorted(losses) == [1, 2, 3, 4, 5] and losses[3] != losses[3]  # NaN logged, step skipped
    assert all(losses[s] == losses[s] for s in (1, 2, 4, 5))
