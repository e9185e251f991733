"""`pretrain_mt.py` with pipeline parallelism (PP=2: encoder stage | decoder stage) on 2 gloo ranks.

One run trains 4 steps (2 micro-batches per step through the 1F1B schedule, validation loss through the schedule at
the end, checkpoints at steps 2 and 4). Its step-2 checkpoint is then resumed twice: under PP=2 (the next steps'
losses must be bitwise those of the uninterrupted run: same batches, optimizer state and RNG streams) and under
PP=1 on one process (the checkpoint is resharded from two stages into one model; the next loss must agree within
1e-5, the tiny model having no dropout). The corpus is generated: a word-for-word toy language family over one
small lexicon, tokenized and preprocessed by the project's tools.
"""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
            "train.log_interval=1", "train.micro_batches=2", "data.max_tokens=256", "optim.lr=3e-3",
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
    assert set(ev["loss"]) == {"de-en", "en-de"} and 0.0 < ev["loss_avg"] < 20.0 and "bleu" not in ev
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
