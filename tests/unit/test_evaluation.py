import json

import pytest
import sacrebleu

from megatron_taskmoe.evaluation import ResultTable, TaskScore, direction_group, score_corpus


def test_score_corpus_matches_sacrebleu():
    hyps = ["the cat sat on the mat", "a dog barks loudly"]
    refs = ["the cat sat on a mat", "the dog barks loudly"]
    s = score_corpus(hyps, refs)
    assert s.bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert s.chrf == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert s.sentences == 2 and "BLEU" in s.signature or "nrefs" in s.signature
    assert score_corpus(refs, refs).bleu == pytest.approx(100.0)
    with pytest.raises(ValueError, match="hypotheses"):
        score_corpus(hyps, refs[:1])


def test_direction_groups():
    assert direction_group("de-en") == "xx-en"
    assert direction_group("en-fr") == "en-xx"
    assert direction_group("fr-de") is None


def test_table_averages_and_formats():
    t = ResultTable(metric="bleu", sizes={"de-en": 100, "en-de": 100, "tr-en": 5, "en-tr": 5}, high_resource_min=50)
    t.add("dense", {"de-en": 10.0, "en-de": 8.0, "tr-en": 4.0, "en-tr": 2.0})
    t.add("moe", {"de-en": TaskScore(bleu=12.0, chrf=40.0, sentences=3), "en-de": 9.0, "tr-en": 5.0, "en-tr": 3.0})
    rec = {r["system"]: r for r in t.records()}
    assert rec["dense"]["avg xx-en"] == pytest.approx(7.0)
    assert rec["dense"]["avg en-xx"] == pytest.approx(5.0)
    assert rec["dense"]["avg high"] == pytest.approx(9.0)
    assert rec["dense"]["avg low"] == pytest.approx(3.0)
    assert rec["moe"]["de-en"] == 12.0 and rec["moe"]["avg"] == pytest.approx(7.25)
    md = t.to_markdown()
    assert md.splitlines()[0].startswith("| system | de-en | tr-en | en-de | en-tr | avg xx-en")
    assert "| moe | 12.0 |" in md
    assert t.to_csv().splitlines()[0].startswith("system,de-en")
    assert json.loads(t.to_json())["rows"][1]["system"] == "moe"
    with pytest.raises(ValueError, match="unknown table format"):
        t.render("html")
