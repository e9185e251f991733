"""Loading trainer checkpoints into one process, and `Translator`: sources built as the dataset builds them, greedy
output equal to a step-by-step greedy decode through `EncoderDecoderModel.decode_step` (the full recompute), weights equal to the trained
ones (validation loss recomputed = the trainer's), and clear errors for bad checkpoints and directions."""

import json
import shutil

import pytest
import torch

from megatron_taskmoe.data.batching import collate
from megatron_taskmoe.data.dataset import MultilingualDataset
from megatron_taskmoe.data.tokenizer import BOS_ID, EOS_ID
from megatron_taskmoe.inference import (CheckpointError, InferenceError, Translator, TranslatorConfig, find_checkpoint,
                                        load_checkpoint)
from megatron_taskmoe.parallel import groups

from tests.helpers import tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root, run_dir = tiny_run.shared_run(tmp_path_factory)
    yield root, run_dir
    if torch.distributed.is_initialized():  # load_checkpoint made a one-process group; leave none behind
        groups.destroy()


@pytest.fixture(scope="module")
def loaded(run):
    return load_checkpoint(run[1], device="cpu")


def test_path_forms_resolve_to_the_latest_checkpoint(run):
    _, run_dir = run
    latest = find_checkpoint(run_dir / "checkpoints")
    assert latest.path.name == "step_00000030"
    assert find_checkpoint(run_dir).path == latest.path
    assert find_checkpoint(latest.path).path == latest.path
    earlier = find_checkpoint(run_dir / "checkpoints" / "step_00000015")
    assert earlier.step == 15


def test_loaded_weights_reproduce_the_trainers_validation_loss(run, loaded):
    root, run_dir = run
    evals = [m for m in tiny_run.metrics(run_dir) if m["kind"] == "eval"]
    assert evals and evals[-1]["step"] == loaded.step == 30
    got = tiny_run.validation_losses(loaded.model, root / "bin", max_sentences=8, model_config=loaded.model_config)
    assert set(got) == set(evals[-1]["loss"])
    for direction, want in evals[-1]["loss"].items():
        assert abs(got[direction] - want) < 1e-5, (direction, got[direction], want)


def test_an_earlier_checkpoint_has_other_weights(run, loaded):
    earlier = load_checkpoint(run[1] / "checkpoints" / "step_00000015", device="cpu")
    name, param = next(iter(loaded.model.named_parameters()))
    assert not torch.equal(dict(earlier.model.named_parameters())[name], param)


def test_sources_are_built_exactly_as_the_dataset_builds_them(run, loaded):
    root, _ = run
    data = MultilingualDataset(root / "bin", "test", ["de-en", "en-fr"])
    translator = Translator(loaded)
    for d, direction in enumerate(data.directions):
        src, tgt = direction.split("-")
        pair = "en-" + (src if tgt == "en" else tgt)  # the corpus files are named en-xx
        sources = (root / "raw" / f"test.{pair}.{src}").read_text().splitlines()
        targets = (root / "raw" / f"test.{pair}.{tgt}").read_text().splitlines()
        samples = translator.samples(sources, src, tgt, targets=targets)
        lo = int(data.offsets_D[d])
        assert len(samples) == int(data.sizes_D[d])
        for i, sample in enumerate(samples):
            want = data[lo + i]
            assert sample["src"] == want["src"].tolist()
            assert sample["tgt_in"] == want["tgt_in"].tolist() and sample["labels"] == want["labels"].tolist()
            for key in ("task_id", "src_lang_id", "tgt_lang_id"):
                assert sample[key] == want[key]
            assert sample["src"][0] == loaded.tokenizer.lang_tag_id(tgt) and sample["src"][-1] == EOS_ID


def greedy_reference(loaded, translator, sentences, src, tgt):
    """Greedy decoding written out step by step over `decode_step`, one sentence at a time."""
    model = loaded.model
    out = []
    for sample in translator.samples(sentences, src, tgt):
        batch = collate([sample])
        state = model.encode(batch["src_tokens"], batch["src_padding_mask"], task_ids=batch["task_ids"],
                             src_lang_ids=batch["src_lang_ids"], tgt_lang_ids=batch["tgt_lang_ids"])
        limit = translator.max_lengths([len(sample["src"])])[0]
        prefix, ids = torch.tensor([[BOS_ID]]), []
        while True:
            logp = model.decode_step(state, prefix, torch.tensor([0]))
            logp[:, translator.banned] = float("-inf")  # pad, bos, unk and the <2xx> tags are never produced
            if len(ids) == limit:  # the search may only end here
                break
            token = int(logp[0].argmax())
            if token == EOS_ID:
                break
            ids.append(token)
            prefix = torch.cat([prefix, torch.tensor([[token]])], dim=1)
        out.append(loaded.tokenizer.decode(ids))
    return out


@pytest.mark.parametrize("direction", ["en-de", "fr-en"])
def test_beam_one_equals_greedy_decoding(run, loaded, direction):
    root, _ = run
    src, tgt = direction.split("-")
    pair = "en-" + (src if tgt == "en" else tgt)
    sentences = (root / "raw" / f"test.{pair}.{src}").read_text().splitlines()[:10] + ["", "the dog"]
    translator = Translator(loaded, TranslatorConfig(beam_size=1, batch_size=5))
    tags = {loaded.tokenizer.lang_tag_id(lang) for lang in loaded.languages}
    assert set(translator.banned) == {0, 1, BOS_ID} | tags
    got = translator.translate(sentences, src, tgt)
    assert got == greedy_reference(loaded, translator, sentences, src, tgt)
    assert any(got), "the tiny model should produce some words"


def test_bf16_decoding_runs_the_same_model_rounded(run, loaded):
    """`load_checkpoint(dtype="bf16")`: the same weights rounded to bf16, the same function to bf16 precision (the
    validation loss within 1 %), and its incremental decoding is the bf16 model's own step-by-step greedy decode."""
    root, run_dir = run
    half = load_checkpoint(run_dir, device="cpu", dtype="bf16")
    assert (loaded.dtype, half.dtype) == ("fp32", "bf16")
    full, rounded = dict(loaded.model.named_parameters()), dict(half.model.named_parameters())
    assert full.keys() == rounded.keys()
    for name, param in rounded.items():
        assert param.dtype == torch.bfloat16 and torch.equal(param, full[name].to(torch.bfloat16)), name
    want = tiny_run.validation_losses(loaded.model, root / "bin", max_sentences=8, model_config=loaded.model_config)
    got = tiny_run.validation_losses(half.model, root / "bin", max_sentences=8, model_config=half.model_config)
    for direction in want:
        assert abs(got[direction] - want[direction]) <= 0.01 * want[direction], (direction, got, want)
    sentences = (root / "raw" / "test.en-de.en").read_text().splitlines()[:10]
    translator = Translator(half, TranslatorConfig(beam_size=1, batch_size=5))
    bf16 = translator.translate(sentences, "en", "de")
    assert bf16 == greedy_reference(half, translator, sentences, "en", "de")
    with pytest.raises(InferenceError, match="dtype 'fp8' is not one of fp32, bf16, fp16"):
        load_checkpoint(run_dir, device="cpu", dtype="fp8")


def test_output_order_does_not_depend_on_batching(run, loaded):
    root, _ = run
    sentences = (root / "raw" / "test.en-fr.en").read_text().splitlines()[:12]
    one = Translator(loaded, TranslatorConfig(beam_size=3, batch_size=1)).translate(sentences, "en", "fr")
    many = Translator(loaded, TranslatorConfig(beam_size=3, batch_size=5)).translate(sentences, "en", "fr")
    assert one == many and len(one) == 12


def test_max_length_respects_the_learned_positions(loaded):
    translator = Translator(loaded, TranslatorConfig(max_len_a=10.0, max_len_b=50))
    cap = loaded.model_config.max_target_positions - 1
    assert translator.max_lengths([3, 500]) == [80, cap]


def test_unknown_direction_and_bad_paths_are_clear_errors(run, loaded, tmp_path):
    with pytest.raises(CheckpointError, match=r"direction de-fr was not trained .*de-en, en-de, en-fr, fr-en"):
        Translator(loaded).translate(["x"], "de", "fr")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        TranslatorConfig(batch_size=0)


def test_partial_saves_are_ignored_and_a_wrong_tokenizer_is_refused(run, tmp_path):
    _, run_dir = run
    root = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints" / "step_00000015", root / "step_00000015")
    shutil.copytree(run_dir / "checkpoints" / "step_00000030", root / ".partial.step_00000045")
    assert find_checkpoint(root).step == 15
    meta_path = root / "step_00000015" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="sha256 .* differs from the tokenizer the model was trained with"):
        load_checkpoint(root)
    (root / "step_00000015" / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer not found"):
        load_checkpoint(root)


def test_a_record_without_the_initialisation_fields_loads_as_the_unscaled_model_it_was(run, loaded, tmp_path):
    """checkpoint.json written before `init_method` / `scale_embedding` existed: such models were built with
    megatron's recipe and unscaled token embeddings, and load that way (same weights, other embedding scale)."""
    _, run_dir = run
    copy = tmp_path / "step_00000030"
    shutil.copytree(run_dir / "checkpoints" / "step_00000030", copy)
    meta = json.loads((copy / "checkpoint.json").read_text())
    assert meta["model_config"]["scale_embedding"] is True and loaded.model.embedding.scale > 1
    del meta["model_config"]["scale_embedding"], meta["model_config"]["init_method"]
    (copy / "checkpoint.json").write_text(json.dumps(meta))
    old = load_checkpoint(copy, device="cpu")
    assert (old.model_config.scale_embedding, old.model_config.init_method) == (False, "normal")
    assert old.model.embedding.scale == 1.0
    weights = dict(old.model.named_parameters())
    assert all(torch.equal(weights[n], p) for n, p in loaded.model.named_parameters())
