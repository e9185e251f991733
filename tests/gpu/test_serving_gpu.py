"""benchmarks/serving.py --untrained --device cuda at the tiny size: our decoder serves the token-MoE, the task-MoE and
its extracted sub-network on the GPU in bf16 (CTranslate2 on the CPU, whose CUDA libraries a machine may lack), the
extract reproduces the whole task-MoE's translations there, and the report says where each ran. Skipped without CUDA."""

from __future__ import annotations

import json

import pytest

from tests.helpers import tiny_run
from tests.helpers.corpus import run_tool

pytestmark = pytest.mark.gpu


def test_serving_benchmark_on_a_gpu(tmp_path):
    tiny_run.prepare_serving_out(tmp_path)
    r = run_tool("benchmarks/serving.py", "--out", str(tmp_path), "--untrained", "--size", "tiny", "--experts", "2",
                 "--sentences", "3", "--repeats", "1", "--threads", "1", "--device", "cuda", "--ct2-device", "cpu",
                 "--dtype", "bf16", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "results_cuda_bf16.json").read_text())
    assert doc["args"]["device"] == "cuda" and len(doc["results"]) == 5
    whole, extracted = doc["results"]["task-MoE (whole)"], doc["results"]["task-MoE (extracted)"]
    assert whole["tokens"] == extracted["tokens"] > 0 and whole["sample"] == extracted["sample"]
    md = (tmp_path / "results_cuda_bf16.md").read_text()
    assert "our decoder on " in md and "CTranslate2 on CPU, 1 thread(s)" in md
