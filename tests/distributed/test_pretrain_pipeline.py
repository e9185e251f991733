"""`pretrain_mt.py` with pipeline parallelism (PP=2: encoder stage | decoder stage) on 2 gloo ranks.

One run trains 4 steps (2 micro-batches per step through the 1F1B schedule, validation at the end: loss through the
schedule, BLEU/chrF per task from translations decoded through the stages, checkpoints at steps 2 and 4). Its step-2
checkpoint is then resumed twice: under PP=2 (the next steps' losses must be bitwise those of the uninterrupted run:
same batches, optimizer state and RNG streams) and under PP=1 on one process (the checkpoint is resharded from two
stages into one model; the next loss must agree within 1e-5, the tiny model having no dropout).

Pipelined decoding is checked against the single-process decode on the same weights: a model one tiny step from
its initialisation (whose translations run long, unlike a 4-step model's, which end at once) is saved by one
process, then the validation translations (token ids, greedy and beam 2), losses, BLEU and routing statistics of
the `Validator` under PP=1 and under PP=2 must be equal. The corpus is generated: a word-for-word toy language
family over one small lexicon, tokenized and preprocessed by the project's tools.
"""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import harness as H

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
LEXICON = {
    "en": "the a house dog cat man woman child sees has is big small red old new and in on with".split(),
    "de": "der ein haus hund katze mann frau kind sieht hat ist gross klein rot alt neu und in auf mit".split(),
}


def _run(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, (" ".join(cmd), result.stdout[-2000:], result.stderr[-5000:])
    return result


def _write_corpus(raw: Path) -> None:
    raw.mkdir(parents=True)
    for split, count, seed in (("train", 300, 1), ("valid", 12, 2)):
        for lang, words in LEXICON.items():
            rng = random.Random(seed)  # the same seed in both languages: aligned word-for-word translations
            lines = [" ".join(words[rng.randrange(len(words))] for _ in range(rng.randint(2, 6)))
                     for _ in range(count)]
            (raw / f"{split}.en-de.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pp_corpus")
    _write_corpus(root / "raw")
    py = sys.executable
    _run([py, "tools/train_tokenizer.py", "--input-dir", str(root / "raw"), "--output-prefix", str(root / "spm"),
          "--vocab-size", "100", "--sentences", "2000", "--threads", "1"])
    _run([py, "tools/preprocess_data.py", "--input-dir", str(root / "raw"), "--tokenizer", str(root / "spm.model"),
          "--output-dir", str(root / "bin"), "--workers", "1", "--no-progress"])
    return root / "bin"


def _pretrain(data_dir: Path, run_dir: Path, nproc: int, *overrides: str) -> None:
    sets = [f"data.data_dir={data_dir}", f"train.run_dir={run_dir}", "train.progress_bar=false",
            "train.log_interval=1", "train.micro_batches=2", "data.batching.max_tokens=256", "optim.lr=3e-3",
            "optim.warmup_steps=1", "checkpoint.interval=2", "eval.max_sentences=8", *overrides]
    args = ["pretrain_mt.py", "--config", "examples/configs/tiny_cpu.yaml", *[x for s in sets for x in ("--set", s)]]
    if nproc == 1:
        _run([sys.executable, *args])
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
          *args])


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir, "train")}


PP2 = ("parallel.pipeline=2", "parallel.encoder_pipeline_stages=1")


def test_pipeline_trains_and_resumes(tmp_path, data_dir):
    full = tmp_path / "full"
    _pretrain(data_dir, full, 2, *PP2, "train.steps=4", "eval.interval=4")
    losses = _losses(full)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(0.0 < v < 20.0 for v in losses.values()), losses
    assert losses[4] < losses[1] - 0.1, losses  # it learns
    (ev,) = _records(full, "eval")
    assert set(ev["loss"]) == {"de-en", "en-de"} and 0.0 < ev["loss_avg"] < 20.0
    # BLEU/chrF per task from translations decoded through the two stages; routing from both stages' layers.
    assert set(ev["bleu"]) == set(ev["chrf"]) == {"de-en", "en-de"}
    assert all(0.0 <= ev[m][d] <= 100.0 for m in ("bleu", "chrf") for d in ev["bleu"])
    assert {name.split(".")[0] for name in ev["routing"]} == {"encoder", "decoder"}
    ckpts = full / "checkpoints"
    assert (ckpts / "step_00000002").is_dir() and (ckpts / "latest").read_text().strip() == "step_00000004"

    # Same layout from the step-2 checkpoint: the continuation is exactly the uninterrupted run.
    resumed = tmp_path / "resumed_pp2"
    _pretrain(data_dir, resumed, 2, *PP2, "train.steps=4", "eval.interval=0",
              f"checkpoint.load={ckpts / 'step_00000002'}")
    assert _losses(resumed) == {3: losses[3], 4: losses[4]}

    # One process, no pipeline: the two stages' checkpoint loads into the whole model, whose next step computes the
    # same loss, gradient norm and MoE aux losses (each stage logs its side's aux losses; the trainer sums them over
    # the pipeline).
    whole = tmp_path / "resumed_pp1"
    _pretrain(data_dir, whole, 1, "train.steps=3", "eval.interval=0", f"checkpoint.load={ckpts / 'step_00000002'}")
    (got,) = _records(whole, "train")
    want = next(r for r in _records(full, "train") if r["step"] == 3)
    assert got["step"] == 3
    for key in ("loss", "grad_norm", "aux/encoder_load_balancing_loss", "aux/decoder_load_balancing_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (key, got, want)


def _validate_job(rank, world, overrides: list[str], out: str, save: bool) -> None:
    """Worker: build the trainer (loading a checkpoint or saving its fresh weights), then the validator's
    translations (greedy and beam 2) and its full record; rank 0 writes them to `out`."""
    from dataclasses import replace

    from megatron_taskmoe.config_io import load_config
    from megatron_taskmoe.training.config import RunConfig
    from megatron_taskmoe.training.loop import Trainer
    from megatron_taskmoe.training.setup import load_corpus, resolve_model_config

    cfg = load_config(RunConfig, ROOT / "examples/configs/tiny_cpu.yaml", overrides)
    corpus = load_corpus(cfg)
    trainer = Trainer(cfg, corpus, resolve_model_config(cfg, corpus, world))
    if save:  # one step at a tiny learning rate: weights still near their initialisation, optimizer state to save
        trainer.train_step()
        trainer.save_checkpoint()
    validator = trainer.build_validator()
    trainer.built.module.eval()
    result = {}
    for beam in (1, 2):
        validator.search = replace(validator.search, beam_size=beam)
        result[f"beam{beam}"] = {d: validator.hypotheses(d) for d in validator.data.directions}
    validator.search = replace(validator.search, beam_size=1)
    result["record"] = validator.run()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def test_pipelined_decoding_equals_single_process(tmp_path, data_dir):
    common = [f"data.data_dir={data_dir}", "data.batching.max_tokens=256", "eval.max_sentences=8", "train.micro_batches=2"]
    one, two = tmp_path / "pp1.json", tmp_path / "pp2.json"
    H.spawn(_validate_job, 1, [*common, f"train.run_dir={tmp_path / 'pp1'}", "optim.lr=1e-5"], str(one), True,
            tmp_dir=str(tmp_path))
    ckpt = tmp_path / "pp1" / "checkpoints" / "step_00000001"
    H.spawn(_validate_job, 2, [*common, f"train.run_dir={tmp_path / 'pp2'}", f"checkpoint.load={ckpt}",
                               *PP2], str(two), False, tmp_dir=str(tmp_path))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    for beam in ("beam1", "beam2"):
        assert set(a[beam]) == {"de-en", "en-de"} and all(len(h) == 8 for h in a[beam].values())
        # an untrained model's translations run long: a non-trivial comparison, token by token
        assert sum(len(ids) for h in a[beam].values() for ids in h) > 8 * 2 * 5, a[beam]
        assert b[beam] == a[beam]
    assert a["beam1"] != a["beam2"]
    ra, rb = a["record"], b["record"]
    assert rb["bleu"] == ra["bleu"] and rb["chrf"] == ra["chrf"]
    for d in ra["loss"]:
        assert rb["loss"][d] == pytest.approx(ra["loss"][d], abs=1e-5)
    assert list(rb["routing"]) == list(ra["routing"])
    for name, entry in ra["routing"].items():
        for task, share in entry["share"].items():
            assert rb["routing"][name]["share"][task] == pytest.approx(share, abs=1e-4), (name, task)
