"""Tokenizer training -> preprocessing -> dataset -> batches, on a tiny generated corpus."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import preprocess_data  # noqa: E402
import train_tokenizer  # noqa: E402

from megatron_taskmoe.data import (  # noqa: E402
    BatchingConfig, BatchIterator, MultilingualDataset, Tokenizer, eval_batches, load_manifest)
from megatron_taskmoe.data.manifest import check_task_map_compatible, build_task_map  # noqa: E402
from megatron_taskmoe.data.bitext import DataError  # noqa: E402

LETTERS = {"en": "abcdefghiklmnoprstuw", "de": "abdeghiklmnorstuwäöü", "fr": "abcdeilmnoprstuéèà"}
EMPTY, TOO_LONG, RATIO = 5, 7, 9  # line numbers (0-based) of pairs each filter must remove


def _sentence(rng, lang, n_words):
    letters = LETTERS[lang]
    return " ".join("".join(rng.choice(list(letters), rng.integers(2, 7))) for _ in range(n_words))


def write_corpus(root: Path, n_train=240, n_valid=30):
    rng = np.random.default_rng(0)
    for xx in ("de", "fr"):
        for split, n in (("train", n_train), ("valid", n_valid)):
            en, other = [], []
            for i in range(n):
                words = int(rng.integers(3, 12))
                en.append(_sentence(rng, "en", words))
                other.append(_sentence(rng, xx, words))
            if split == "train":
                other[EMPTY] = "   "
                en[TOO_LONG] = _sentence(rng, "en", 150)
                other[TOO_LONG] = _sentence(rng, xx, 150)
                en[RATIO], other[RATIO] = "ab", _sentence(rng, xx, 15)
            (root / f"{split}.en-{xx}.en").write_text("\n".join(en) + "\n", encoding="utf-8")
            (root / f"{split}.en-{xx}.{xx}").write_text("\n".join(other) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def spm_model(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    assert train_tokenizer.main(["--input-dir", str(corpus), "--output-prefix", str(prefix), "--vocab-size", "300",
                                 "--sentences", "2000", "--threads", "1"]) == 0
    return Path(f"{prefix}.model")


@pytest.fixture(scope="module")
def data_dir(corpus, spm_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bin")
    assert preprocess_data.main(["--input-dir", str(corpus), "--tokenizer", str(spm_model), "--output-dir", str(out),
                                 "--workers", "1", "--max-len", "100", "--max-ratio", "3", "--no-progress"]) == 0
    return out


def test_tokenizer_special_ids_tags_and_determinism(corpus, spm_model, tmp_path):
    tok = Tokenizer(spm_model)
    assert (tok.sp.pad_id(), tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id()) == (0, 1, 2, 3)
    tags = tok.check_languages(["de", "en", "fr"])
    assert len(set(tags.values())) == 3
    assert tok.encode(["<2de>"])[0] == [tags["de"]] or tok.encode(["<2de>"])[0][-1] == tags["de"]
    again = tmp_path / "again"
    assert train_tokenizer.main(["--input-dir", str(corpus), "--output-prefix", str(again), "--vocab-size", "300",
                                 "--sentences", "2000", "--threads", "1"]) == 0
    other = Tokenizer(f"{again}.model")  # the file also records its paths; the vocabulary must be identical
    assert [(other.sp.id_to_piece(i), other.sp.get_score(i)) for i in range(other.vocab_size)] == [
        (tok.sp.id_to_piece(i), tok.sp.get_score(i)) for i in range(tok.vocab_size)]


def test_round_trip_counts_and_text(corpus, spm_model, data_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    manifest = load_manifest(data_dir)
    tok = Tokenizer(spm_model)
    assert manifest["languages"] == ["de", "en", "fr"]
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == tok.sha256()
    removed = manifest["filters"]["removed"]["train.en-de"]
    assert removed == {"empty": 1, "too_long": 1, "ratio": 1}
    src_lines = (corpus / "train.en-de.en").read_text(encoding="utf-8").splitlines()
    tgt_lines = (corpus / "train.en-de.de").read_text(encoding="utf-8").splitlines()
    kept = [i for i in range(len(src_lines)) if i not in (EMPTY, TOO_LONG, RATIO)]
    for direction, src_file, tgt_file in (("en-de", src_lines, tgt_lines), ("de-en", tgt_lines, src_lines)):
        info = manifest["directions"][direction]["splits"]["train"]
        src_ds = IndexedDataset(str(data_dir / info["src_prefix"]))
        tgt_ds = IndexedDataset(str(data_dir / info["tgt_prefix"]))
        assert len(src_ds) == len(tgt_ds) == len(src_lines) - 3 == info["sentences"]
        assert int(src_ds.sequence_lengths.sum()) == info["src_tokens"]
        for j, i in enumerate(kept):
            assert tok.decode(src_ds[j]) == src_file[i]
            assert tok.decode(tgt_ds[j]) == tgt_file[i]
    assert (data_dir / "train.en-de.de.bin").read_bytes() == (data_dir / "train.de-en.de.bin").read_bytes()
    assert not list(data_dir.glob(".tmp*"))


def test_two_workers_write_identical_files(corpus, spm_model, data_dir, tmp_path):
    assert preprocess_data.main(["--input-dir", str(corpus), "--tokenizer", str(spm_model), "--output-dir",
                                 str(tmp_path), "--workers", "2", "--chunk-pairs", "50", "--max-len", "100",
                                 "--no-progress"]) == 0
    for path in sorted(data_dir.glob("*.bin")) + sorted(data_dir.glob("*.idx")):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_task_maps(data_dir, tmp_path):
    directions = list(load_manifest(data_dir)["directions"])
    assert sorted(directions) == ["de-en", "en-de", "en-fr", "fr-en"]
    assert build_task_map(directions, "direction")["direction_to_task"] == {"de-en": 0, "en-de": 1, "en-fr": 2,
                                                                           "fr-en": 3}
    target = build_task_map(directions, "target")  # tasks to-de, to-en, to-fr
    assert target["direction_to_task"] == {"en-de": 0, "de-en": 1, "fr-en": 1, "en-fr": 2}
    assert build_task_map(directions, "pair")["tasks"] == ["de-en", "en-fr"]
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"groups": {"xx-en": ["de-en", "fr-en"], "en-xx": ["en-de", "en-fr"]}}))
    m = build_task_map(directions, str(groups))
    assert m["tasks"] == ["xx-en", "en-xx"] and m["direction_to_task"]["en-fr"] == 1
    groups.write_text(json.dumps({"groups": {"xx-en": ["de-en", "fr-en"], "en-xx": ["en-de"]}}))
    with pytest.raises(DataError, match="en-fr are in no group"):
        build_task_map(directions, str(groups))
    with pytest.raises(DataError, match="task id of de-en"):
        check_task_map_compatible(build_task_map(directions, "target"), build_task_map(directions, "direction"))


def test_samples_and_batches(data_dir, spm_model):
    ds = MultilingualDataset(data_dir, "train")
    tok = Tokenizer(spm_model)
    manifest = ds.manifest
    s = ds[int(ds.offsets_D[ds.directions.index("en-fr")]) + 3]
    assert s["src"][0] == tok.lang_tag_id("fr") and s["src"][-1] == 3
    assert s["tgt_in"][0] == 2 and s["labels"][-1] == 3
    np.testing.assert_array_equal(s["tgt_in"][1:], s["labels"][:-1])
    assert s["task_id"] == manifest["directions"]["en-fr"]["task_id"]
    assert (s["src_lang_id"], s["tgt_lang_id"]) == (1, 2)

    cfg = BatchingConfig(max_tokens=256, window_samples=200, pad_to_multiple=8, task_homogeneous=True)
    it = BatchIterator(ds, temperature=5.0, batching=cfg)
    for _ in range(10):
        b = next(it)
        B, S = b["src_tokens"].shape
        T = b["tgt_input"].shape[1]
        assert S % 8 == 0 and T % 8 == 0 and B * max(S, T) <= 256
        assert b["task_ids"].unique().numel() == 1
        assert torch.equal(b["src_padding_mask"], b["src_tokens"] == 0)
        assert torch.equal(b["tgt_padding_mask"], b["tgt_input"] == 0)
        assert torch.equal(b["loss_mask"] > 0, b["labels"] != 0)
        assert b["labels"].dtype == torch.long and b["loss_mask"].dtype == torch.float32
    resumed = BatchIterator(ds, temperature=5.0, batching=cfg, consumed_samples=b["consumed_samples"])
    nxt, again = next(it), next(resumed)
    assert all(torch.equal(nxt[k], again[k]) for k in nxt if isinstance(nxt[k], torch.Tensor))

    fixed = BatchingConfig(batch_size=4, window_samples=40, fixed_src_len=48, fixed_tgt_len=48)
    b = next(BatchIterator(MultilingualDataset(data_dir, "train", max_src_len=46, max_tgt_len=47),
                           batching=fixed))
    assert b["src_tokens"].shape == (4, 48) and b["tgt_input"].shape == (4, 48)


def test_eval_batches_cover_the_direction_once(data_dir):
    ds = MultilingualDataset(data_dir, "valid", directions=["de-en"])
    seen = torch.cat([b["indices"] for b in eval_batches(ds, "de-en", max_tokens=200)])
    assert sorted(seen.tolist()) == list(range(30))
    with pytest.raises(DataError, match="no 'valid' split|have no"):
        MultilingualDataset(data_dir, "valid", directions=["de-xx"])


def test_references_are_the_raw_targets_of_the_dataset_items(spm_model, tmp_path):
    """Non-train splits carry each direction's raw target text: line i is the raw target of dataset item i (filtered
    pairs left out, line breaks inside a sentence turned into spaces)."""
    rng = np.random.default_rng(1)
    raw, out = tmp_path / "raw", tmp_path / "bin"
    raw.mkdir()
    words = rng.integers(4, 10, size=30)  # the same number of words on every side: no pair hits the ratio filter
    text = {lang: [_sentence(rng, lang, int(n)) for n in words] for lang in LETTERS}
    for xx in ("de", "fr"):
        (raw / f"train.en-{xx}.en").write_text("\n".join(text["en"]) + "\n", encoding="utf-8")
        (raw / f"train.en-{xx}.{xx}").write_text("\n".join(text[xx]) + "\n", encoding="utf-8")
    en, de = list(text["en"]), list(text["de"])
    de[3] = "  "  # empty
    en[7] = _sentence(rng, "en", 150)  # too long
    de[11] = "ab\rcd " + de[11]  # a carriage return inside a line
    (raw / "valid.en-de.en").write_bytes(("\n".join(en) + "\n").encode())
    (raw / "valid.en-de.de").write_bytes(("\n".join(de) + "\n").encode())
    records = [{"src": f, "tgt": e} for f, e in zip(text["fr"], text["en"])]
    records[5]["src"] = "eins\nzwei " + records[5]["src"]  # JSONL strings may hold newlines
    records[9]["tgt"] = ""
    (raw / "valid.fr-en.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert preprocess_data.main(["--input-dir", str(raw), "--tokenizer", str(spm_model), "--output-dir", str(out),
                                 "--workers", "2", "--chunk-pairs", "8", "--max-len", "100", "--no-progress"]) == 0
    manifest = load_manifest(out)
    tok = Tokenizer(spm_model)
    kept_en_de = [i for i in range(30) if i not in (3, 7)]
    kept_fr_en = [i for i in range(30) if i != 9]
    expected = {"en-de": [de[i] for i in kept_en_de], "de-en": [en[i] for i in kept_en_de],
                "fr-en": [records[i]["tgt"] for i in kept_fr_en], "en-fr": [records[i]["src"] for i in kept_fr_en]}
    for direction, targets in expected.items():
        info = manifest["directions"][direction]["splits"]["valid"]
        assert info["references"] == f"valid.{direction}.ref.{direction[-2:]}"
        assert "references" not in manifest["directions"][direction]["splits"]["train"]
        lines = (out / info["references"]).read_bytes().decode("utf-8").split("\n")
        assert lines[-1] == "" and len(lines) - 1 == len(targets)
        ds = MultilingualDataset(out, "valid", directions=[direction])
        assert len(ds) == len(targets)
        for i, target in enumerate(targets):
            assert lines[i] == target.replace("\r", " ").replace("\n", " ")
            if target == lines[i]:
                assert tok.encode([lines[i]])[0] == ds[i]["labels"][:-1].tolist()
    assert sum("\r" in t or "\n" in t for t in expected["en-de"] + expected["en-fr"]) == 2


def test_validation_scores_against_the_raw_references(data_dir, caplog):
    """The trainer's validation set pairs every decoded batch row with the raw reference of its dataset item (what
    tools/evaluate.py scores against), and falls back to the decoded target pieces, with a warning, for data
    directories preprocessed without reference files."""
    from megatron_taskmoe.model.config import ModelConfig
    from megatron_taskmoe.training.setup import Corpus
    from megatron_taskmoe.training.validation import ValidationSet

    manifest = load_manifest(data_dir)
    directions = sorted(d for d in manifest["directions"] if "valid" in manifest["directions"][d]["splits"])
    model_cfg = ModelConfig(vocab_size=manifest["tokenizer"]["vocab_size"])

    def validation_set(corpus):
        return ValidationSet.load(corpus, "valid", max_src_len=model_cfg.max_source_positions - 2,
                                  max_tgt_len=model_cfg.max_target_positions - 1, max_sentences=1000,
                                  batching=BatchingConfig(max_tokens=64, pad_to_multiple=8))

    data = validation_set(Corpus(data_dir=data_dir, manifest=manifest, directions=directions))
    for direction in directions:
        name = manifest["directions"][direction]["splits"]["valid"]["references"]
        raw = (data_dir / name).read_text(encoding="utf-8").splitlines()
        seen = []
        for items, batch in data.indexed_batches(direction):
            assert data.references_of(direction, items, batch) == [raw[i] for i in items]
            seen += items
        assert sorted(seen) == list(range(len(raw)))

    stripped = json.loads(json.dumps(manifest))
    for info in stripped["directions"].values():
        info["splits"]["valid"].pop("references", None)
    with caplog.at_level("WARNING"):
        fallback = validation_set(Corpus(data_dir=data_dir, manifest=stripped, directions=directions))
    assert "has no raw references" in caplog.text
    direction = directions[0]
    items, batch = next(fallback.indexed_batches(direction))
    tok = Tokenizer(Path(manifest["tokenizer"]["path"]))
    decoded = fallback.references_of(direction, items, batch)
    for text, labels, mask in zip(decoded, batch["labels"], batch["loss_mask"]):
        assert tok.encode([text])[0] == labels[mask.bool()].tolist()[:-1]
