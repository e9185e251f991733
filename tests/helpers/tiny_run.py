"""A tiny trained run for the inference/evaluation/routing tests: generated corpus -> tokenizer -> preprocessing
(in-process) -> a few `pretrain_mt.py` steps (subprocess, so the trainer's process groups stay out of the test).

The corpus is a word-for-word toy language family (en, de, fr over one small lexicon): a few dozen training steps
are enough for the model to produce short outputs that end with eos, which is what decoding tests need.
`tiny_run(root)` caches its result per root and per option set within the pytest process; `shared_run` gives all
test modules of a session the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

LEXICON = {
    "en": "the a house dog cat man woman child sees has is big small red old new and in on with".split(),
    "de": "der ein haus hund katze mann frau kind sieht hat ist gross klein rot alt neu und in auf mit".split(),
    "fr": "le un maison chien chat homme femme enfant voit a est grand petit rouge vieux neuf et dans sur avec".split(),
}


def sentences(lang: str, seed: int, count: int) -> list[str]:
    """`count` sentences of `lang`; the same seed gives aligned translations in every language."""
    rng = random.Random(seed)
    words = LEXICON[lang]
    out = []
    for _ in range(count):
        length = rng.randint(2, 6)
        out.append(" ".join(words[rng.randrange(len(words))] for _ in range(length)))
    return out


def write_corpus(raw: Path, *, train: int = 600, valid: int = 24, test: int = 24) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for split, count, seed in (("train", train, 1), ("valid", valid, 2), ("test", test, 3)):
        for other in ("de", "fr"):
            for lang in ("en", other):
                text = "".join(s + "\n" for s in sentences(lang, seed * 100 + len(other), count))
                (raw / f"{split}.en-{other}.{lang}").write_text(text, encoding="utf-8")


def run(cmd: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def prepare_data(root: Path) -> tuple[Path, Path]:
    """(raw bitext dir, preprocessed dir); made once per root."""
    raw, binary = root / "raw", root / "bin"
    if (binary / "manifest.json").is_file():
        return raw, binary
    write_corpus(raw)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import preprocess_data
        import train_tokenizer
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert train_tokenizer.main(["--input-dir", str(raw), "--output-prefix", str(root / "spm"), "--vocab-size", "120",
                                 "--sentences", "3000", "--threads", "1"]) == 0
    assert preprocess_data.main(["--input-dir", str(raw), "--tokenizer", str(root / "spm.model"), "--output-dir",
                                 str(binary), "--workers", "1", "--no-progress"]) == 0
    return raw, binary


def prepare_serving_out(out: Path) -> None:
    """`out` as benchmarks/serving.py's data step leaves it (bible/, data/, data_info.json, spm.model), from the
    tiny generated corpus in place of the Bible."""
    raw, binary = prepare_data(out)
    (out / "bible").symlink_to(raw)
    (out / "data").symlink_to(binary)
    (out / "data_info.json").write_text(json.dumps({"seconds": {}, "languages": ["de", "fr"]}))


def train(root: Path, run_dir: Path, *, steps: int = 30, nproc: int = 1, overrides: tuple[str, ...] = (),
          python: str = PYTHON) -> Path:
    """Train `steps` steps into `run_dir` (torchrun with `nproc` gloo processes when nproc > 1) with the
    interpreter `python` (this one by default); a run directory with a checkpoint resumes from it. The trainer's
    log (stderr) is kept as `run_dir/train.log`."""
    _, binary = prepare_data(root)
    args = ["pretrain_mt.py", "--config", "examples/configs/tiny_cpu.yaml",
            "--set", f"data.data_dir={binary}", "--set", f"train.run_dir={run_dir}", "--set", f"train.steps={steps}",
            "--set", "train.progress_bar=false", "--set", "optim.warmup_steps=5", "--set", "optim.lr=0.003",
            "--set", "data.batching.max_tokens=512", "--set", f"eval.interval={steps}", "--set", "eval.max_sentences=8",
            "--set", f"checkpoint.interval={max(1, steps // 2)}", *[x for o in overrides for x in ("--set", o)]]
    if nproc > 1:
        from megatron_taskmoe.parallel.groups import free_port

        cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(free_port()), *args]
    else:
        cmd = [python, *args]
    result = run(cmd, timeout=600)
    (run_dir / "train.log").write_text(result.stderr, encoding="utf-8")
    return run_dir


_CACHE: dict[tuple, Path] = {}


def tiny_run(root: Path, **kwargs) -> Path:
    """The run directory of a tiny trained run under `root` (trained once per root and options)."""
    options = json.dumps(kwargs, sort_keys=True, default=str)
    key = (str(root), options)
    if key not in _CACHE:
        # named by the options, so runs with other options never share a directory, even when this module is
        # imported under two names (two caches)
        name = "run-" + hashlib.sha256(options.encode()).hexdigest()[:12]
        _CACHE[key] = train(root, root / name, **kwargs)
    return _CACHE[key]


def shared_run(tmp_path_factory, **kwargs) -> tuple[Path, Path]:
    """(root, run directory) of a tiny run shared by every test module of the pytest session (nothing writes
    into it; tests that alter a checkpoint copy it first)."""
    root = tmp_path_factory.getbasetemp() / "tiny_run_shared"
    root.mkdir(exist_ok=True)
    return root, tiny_run(root, **kwargs)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def validation_losses(model, data_dir: Path, *, max_sentences: int, model_config) -> dict[str, float]:
    """Per-direction validation loss as the trainer's Validator computes it (the first `max_sentences` pairs of each
    direction, mean label-smoothed token loss); the per-token loss does not depend on how sentences are batched."""
    import torch

    from megatron_taskmoe.data.batching import MODEL_INPUT_KEYS, collate, to_device
    from megatron_taskmoe.data.dataset import MultilingualDataset

    data = MultilingualDataset(data_dir, "valid", None, max_src_len=model_config.max_source_positions - 2,
                               max_tgt_len=model_config.max_target_positions - 1)
    device = next(model.parameters()).device
    out = {}
    with torch.no_grad():
        for d, direction in enumerate(data.directions):
            lo = int(data.offsets_D[d])
            n = min(int(data.sizes_D[d]), max_sentences)
            batch = collate([data[lo + i] for i in range(n)])
            loss_BT = model(**to_device(batch, device, keys=MODEL_INPUT_KEYS))
            mask = batch["loss_mask"].to(device)
            out[direction] = float((loss_BT.double() * mask).sum() / mask.sum())
    return out
