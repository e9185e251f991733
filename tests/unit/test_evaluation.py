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


def test_bleu_tokenizer_follows_the_target_language():
    from megatron_taskmoe.evaluation import bleu_tokenizer

    assert bleu_tokenizer("de") == bleu_tokenizer(None) == "13a"
    assert bleu_tokenizer("zh") == "zh"
    # Japanese / Korean: MeCab's tokenizers where their extras are installed, else characters
    assert bleu_tokenizer("ja") in ("ja-mecab", "char") and bleu_tokenizer("ko") in ("ko-mecab", "char")
    assert bleu_tokenizer("de", "flores200") == "flores200"
    hyps, refs = ["我喜欢猫"], ["我喜欢狗"]
    zh = score_corpus(hyps, refs, tgt_lang="zh")
    assert "tok:zh" in zh.signature and zh.bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)
    assert score_corpus(hyps, refs, tgt_lang="de").bleu != zh.bleu  # 13a leaves the sentence one token
    assert "tok:char" in score_corpus(hyps, refs, tokenize="char").signature


def test_tables_carry_their_sacrebleu_signatures():
    t = ResultTable(metric="bleu")
    t.add("moe", {"en-de": score_corpus(["a b c d"], ["a b c d"], tgt_lang="de"),
                  "en-zh": score_corpus(["我喜欢猫"], ["我喜欢猫"], tgt_lang="zh")})
    md = t.to_markdown()
    assert "sacrebleu bleu: " in md and "tok:13a" in md and "tok:zh" in md and "(en-zh)" in md
    assert set(json.loads(t.to_json())["signatures"]) == set(t.signatures)
    chrf = ResultTable(metric="chrf")
    chrf.add("moe", {"en-de": score_corpus(["a b"], ["a b"])})
    assert chrf.to_markdown().rstrip().splitlines()[-1].startswith("sacrebleu chrf: nrefs:1")
