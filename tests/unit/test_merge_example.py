"""examples/merge/run.py (Pham et al. 5.2.2 at demo scale; run by hand, ~15 min): its option checking, which fails
before any slow stage, and its results table/picture on a made-up score set."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("merge_example", ROOT / "examples" / "merge" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--group-a", "xx"], "--group-a 'xx' is not a Bible language"),
    (["--group-a", "de", "--group-b", "de"], "disjoint task sets"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--test-sentences", "-1"], "--test-sentences must be >= 0"),
    (["--config", "nowhere.yaml"], "--config nowhere.yaml: no such file"),
])
def test_bad_options_exit_2_before_any_work(example, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        example.main([str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_results_table_and_picture(example, tmp_path):
    import argparse

    args = argparse.Namespace(group_a="fr", group_b="de", steps=10, merged_steps=5, beam=1)
    score = lambda b, c: {"bleu": b, "chrf": c, "sentences": 3, "signature": "sig"}  # noqa: E731
    details = {"A": {"checkpoint": "a", "step": 10, "fr-en": score(2, 20), "en-fr": score(1, 10)},
               "B": {"checkpoint": "b", "step": 10, "de-en": score(3, 30), "en-de": score(4, 40)},
               "merged@0": {d: score(0.5, 5) for d in ("fr-en", "en-fr", "de-en", "en-de")},
               "merged@5": {d: score(1.5, 15) for d in ("fr-en", "en-fr", "de-en", "en-de")}}
    results = example.build_results(args, details, "merged@5", {"data": 1.0}, 60.0)
    assert results["scores"]["alone"]["de-en"] == {"bleu": 3, "chrf": 30, "model": "B"}
    assert results["averages"]["alone"] == {"bleu": 2.5, "chrf": 25.0}
    assert results["averages"]["merged@5"]["chrf"] == 15
    json.dumps(results)
    table = example.to_markdown(results)
    assert "| A or B alone | 2.0 | 1.0 | 3.0 | 4.0 | 2.5 |" in table and "| merged@0 |" in table
    example.plot_results(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG" and len(list(tmp_path.iterdir())) == 1


def test_results_with_the_control(example, tmp_path):
    import argparse

    args = argparse.Namespace(group_a="fr", group_b="de", steps=10, merged_steps=5, beam=1)
    score = lambda b, c: {"bleu": b, "chrf": c, "sentences": 3, "signature": "sig"}  # noqa: E731
    four = ("fr-en", "en-fr", "de-en", "en-de")
    details = {"A": {"fr-en": score(2, 20), "en-fr": score(1, 10)}, "B": {"de-en": score(3, 30), "en-de": score(4, 40)},
               "merged@0": {d: score(0.5, 5) for d in four}, "merged@5": {d: score(1.5, 15) for d in four},
               "A+5": {"fr-en": score(2.5, 21), "en-fr": score(1.5, 11)},
               "B+5": {"de-en": score(3.5, 31), "en-de": score(4.5, 41)}}
    results = example.build_results(args, details, "merged@5", {}, 60.0)
    assert results["systems"] == ["alone", "merged@0", "merged@5", "alone+5"] and results["control_steps"] == 5
    assert results["scores"]["alone+5"]["en-de"] == {"bleu": 4.5, "chrf": 41, "model": "B+5"}
    assert results["averages"]["alone+5"] == {"bleu": 3.0, "chrf": 26.0}
    table = example.to_markdown(results)
    assert "| A or B +5 steps (control) | 21.0 | 11.0 | 31.0 | 41.0 | 26.0 |" in table
    assert "control: A and B each trained 5 more steps" in table
    example.plot_results(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").is_file()
    # Without the control's scores (--no-control) there is no control row.
    del details["A+5"], details["B+5"]
    results = example.build_results(args, details, "merged@5", {}, 60.0)
    assert "alone+5" not in results["systems"] and results["control_steps"] is None
    assert "(control)" not in example.to_markdown(results)


def test_own_adapter_share(example):
    doc = {"routing": {"tasks": ["de-en", "fr-en", "en-fr"], "layers": [
        {"kind": "experts", "counts": [[5, 5], [5, 5], [5, 5]]},
        {"kind": "adapters", "counts": [[0, 1, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]]},
        {"kind": "adapters", "counts": [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]]}]}}
    share = example.own_adapter_share(doc, {"a": [0, 1], "b": [2, 3]}, "fr")
    assert share == {"de-en": pytest.approx((0.75 + 1.0) / 2), "fr-en": pytest.approx((1.0 + 0.5) / 2)}


def test_output_made_with_other_settings_is_refused(example, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"group_a": "fr", "group_b": "de", "steps": 7}))
    assert example.main([str(out), "--steps", "400"]) == 2
    err = capsys.readouterr().err
    assert "made with other settings" in err and "steps: 7 there, 400 now" in err
    assert sorted(p.name for p in out.iterdir()) == ["settings.json"]
