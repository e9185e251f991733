"""benchmarks/serving.py's bookkeeping: the two training configs differ only in routing, the figures (tokens/s,
sentences/s, medians of per-repeat ratios, BLEU of the outputs) are computed from what the systems returned, and an
--untrained run says so and keeps its own output directory."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serving_benchmark", ROOT / "benchmarks" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_token_and_task_models_differ_only_in_routing(bench):
    args = bench.parse_args(["--out", "x", "--size", "small", "--experts", "8"])
    token, task = (bench.run_config(args, s, Path("o")) for s in bench.SYSTEMS)
    assert (token["model"].pop("system"), task["model"].pop("system")) == ("kudugunta_token", "kudugunta_target")
    assert {**token, "train": None} == {**task, "train": None}
    assert token["train"]["seed"] == task["train"]["seed"] and token["train"]["steps"] == task["train"]["steps"]
    assert token["model"]["overrides"]["moe"] == {"num_experts": 8, "encoder": {"layer_freq": 2},
                                                  "decoder": {"layer_freq": 2}}
    from megatron_taskmoe.training.config import ModelSection

    built = {name: ModelSection(system=bench.PRESETS[name], **{k: v for k, v in cfg["model"].items()
                                                               if k != "system"}).build(
        vocab_size=100, num_tasks=4, num_languages=3) for name, cfg in (("token", token), ("task", task))}
    for name, model in built.items():  # what pretrain_mt.py builds: same sizes and experts, routing apart
        assert (model.hidden_size, model.moe.num_experts, model.moe.topk, model.moe.encoder.layer_freq) == (
            256, 8, 2, 2), name
        assert model.moe.adapters.mode == "none"
    assert (built["token"].moe.encoder.mode, built["token"].moe.decoder.mode) == ("token", "token")
    for side in (built["task"].moe.encoder, built["task"].moe.decoder):
        assert (side.mode, side.task_source) == ("task", "target_language")
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x", "--target-lang", "ru"])


def test_measure_computes_rates_ratios_and_scores_from_the_outputs(bench):
    args = bench.parse_args(["--out", "x", "--repeats", "3"])
    tests = {"de-en": (["a", "b"], ["w1 w2 w3 w4", "w3 w4 w1 w2"]), "fr-en": (["c"], ["w4 w3 w2 w1"])}
    words = {"a": [1, 2, 3, 4], "b": [3, 4, 1, 2], "c": [4, 3, 2, 1]}
    vocab = {i: f"w{i}" for i in range(1, 6)}
    # seconds each system takes per call, per repeat (the fake clock advances by them)
    cost = {"token-MoE (whole)": [4.0, 2.0, 4.0], "task-MoE (whole)": [2.0, 2.0, 2.0],
            "task-MoE (extracted)": [1.0, 1.0, 2.0], "task-MoE -> CTranslate2 fp32": [0.5, 0.5, 0.5]}
    now, calls = [0.0], {name: 0 for name in cost}

    def system(name, extra):
        def translate(sentences, src, tgt):
            now[0] += cost[name][calls[name] // len(tests)] / len(tests)
            calls[name] += 1
            return [words[s] + extra for s in sentences]
        return translate

    fns = {name: system(name, [5] if name.startswith("token") else []) for name in cost}
    results = bench.measure(args, fns, tests, lambda ids: " ".join(vocab[i] for i in ids), clock=lambda: now[0])
    token, extracted = results["token-MoE (whole)"], results["task-MoE (extracted)"]
    assert token["tokens"] == 15 and extracted["tokens"] == 12  # the token-MoE's outputs carry one extra word each
    assert token["seconds"] == pytest.approx([4.0, 2.0, 4.0])
    assert token["tokens_per_s"] == pytest.approx([3.75, 7.5, 3.75])
    assert extracted["sentences_per_s"] == pytest.approx([3.0, 3.0, 1.5])
    # best time: each direction's fastest repeat, summed (token-MoE 1 + 1 s, extracted 0.5 + 0.5 s)
    assert token["best_seconds"] == pytest.approx(2.0) and extracted["best_seconds"] == pytest.approx(1.0)
    assert extracted["best_tokens_per_s"] == pytest.approx(12.0) and extracted["best_sentences_per_s"] == 3.0
    assert extracted["ratio_to_token_moe"] == pytest.approx((12 / 1.0) / (15 / 2.0))
    # per-repeat ratios (12/1)/(15/4), (12/1)/(15/2), (12/2)/(15/4) -> median 1.6
    assert extracted["median_ratio_to_token_moe"] == pytest.approx(1.6)
    assert extracted["ratio_to_task_moe_whole"] == pytest.approx(2.0)
    assert results["task-MoE -> CTranslate2 fp32"]["ratio_to_extracted_ours"] == pytest.approx(2.0)
    assert extracted["bleu"] == pytest.approx(100.0) and extracted["chrf"] == pytest.approx(100.0)
    assert token["bleu"] < 100.0 and token["chrf"] < 100.0
    md = bench.markdown(args, results, {}, "fake.Decoder", "0.0", sorted(tests))
    assert "| task-MoE (extracted) | 0 | 12.0 | 3.00 | 1.60 | 1.60 | 100.0 | 100.0 |" in md
    assert "2.00x task-MoE (whole) (the same translations" in md


def test_untrained_runs_say_so_and_keep_their_own_out(bench, tmp_path):
    args = bench.parse_args(["--out", str(tmp_path), "--untrained", "--size", "tiny"])
    assert bench.model_path(args, tmp_path, "task") == tmp_path / "task" / "model.safetensors"
    assert bench.model_path(bench.parse_args(["--out", str(tmp_path)]), tmp_path, "task") == tmp_path / "task" / "run"
    results = {name: {"best_tokens_per_s": 10.0, "best_sentences_per_s": 1.0, "ratio_to_token_moe": 1.0,
                      "median_ratio_to_token_moe": 1.0, "bleu": 0.0, "chrf": 1.0}
               for name in ("token-MoE (whole)", "task-MoE (whole)")}
    md = bench.markdown(args, results, {}, "fake.Decoder", "0.0", ["de-en"])
    assert md.splitlines()[0].endswith("size `tiny`, UNTRAINED models (throughput only)")
    assert "BLEU and chrF are not meaningful" in md and "training steps" not in md
    trained = bench.markdown(bench.parse_args(["--out", "x", "--size", "tiny"]), results, {}, "fake.Decoder", "0.0",
                             ["de-en"])
    assert "UNTRAINED" not in trained and "400 training steps" in trained

    # a trained.json of the other mode in --out: refused (the serving forms would be reused)
    (tmp_path / "task").mkdir()
    cfg = bench.run_config(args, "task", tmp_path)
    (tmp_path / "task" / "trained.json").write_text(json.dumps({"config": cfg, "untrained": True}))
    assert bench._done(tmp_path / "task" / "trained.json", cfg, untrained=True) is not None
    assert bench._done(tmp_path / "task" / "trained.json", cfg, untrained=False) is None
    assert bench._done(tmp_path / "task" / "trained.json", {**cfg, "train": {}}, untrained=True) is None
    bench.parse_args(["--out", str(tmp_path), "--untrained"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", str(tmp_path)])


def test_devices_are_checked_before_any_work_and_name_their_reports(bench, capsys):
    cpu = bench.parse_args(["--out", "x"])
    assert (cpu.device, cpu.ct2_device) == ("cpu", "cpu")
    assert bench.results_stem(cpu) == "results" and bench.where(cpu) == "2 thread(s)"
    assert bench.results_stem(bench.parse_args(["--out", "x", "--dtype", "bf16"])) == "results_bf16"
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x", "--device", "cuda", "--decoder", "reference"])
    assert "--device cuda needs --decoder trainer" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--out", "x", "--device", "cuda"])
        assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
    else:
        gpu = bench.parse_args(["--out", "x", "--device", "cuda", "--ct2-device", "cpu", "--dtype", "bf16"])
        assert bench.results_stem(gpu) == "results_cuda_bf16"
        assert bench.where(gpu).startswith("our decoder on ") and bench.where(gpu).endswith("CTranslate2 on CPU, "
                                                                                              "2 thread(s)")
