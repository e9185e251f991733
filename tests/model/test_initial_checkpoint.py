"""`training.initial.initial_checkpoint`: a run config's step-0 model is the one the trainer builds (`setup.build`,
optimizer and DDP included), its single file reads back into a model with the same weights and a valid record, and
`inference.load_checkpoint` serves it (`load_single_file`)."""

import hashlib
import json

import pytest
import torch

from megatron_taskmoe.checkpoint.record import CheckpointRecord
from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError, FullCheckpoint
from megatron_taskmoe.checkpoint_tools.models import model_from_full, model_from_single_file
from megatron_taskmoe.checkpoint_tools.single_file import read_single_file, write_single_file
from megatron_taskmoe.config_io import from_dict, to_dict
from megatron_taskmoe.inference import CheckpointError, Translator, TranslatorConfig, load_checkpoint
from megatron_taskmoe.model.config import ModelConfig
from megatron_taskmoe.parallel import groups
from megatron_taskmoe.training import setup
from megatron_taskmoe.training.config import RunConfig
from megatron_taskmoe.training.initial import initial_checkpoint
from tests.helpers.tiny_run import prepare_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    _, binary = prepare_data(tmp_path_factory.mktemp("initial"))
    return binary


@pytest.fixture
def one_process():
    yield
    groups.destroy()


def run_config(data_dir, seed=7, system="kudugunta_target") -> RunConfig:
    """A task-MoE (routed by target language) with 4 experts, as benchmarks/serving.py configures its runs."""
    overrides = {"moe": {"num_experts": 4}} if system != "dense" else {}
    return from_dict(RunConfig, {
        "model": {"system": system, "size": "tiny", "overrides": overrides},
        "data": {"data_dir": str(data_dir)}, "train": {"seed": seed, "run_dir": "unused"}})


def weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def test_initial_checkpoint_is_the_trainers_step_0_model_and_reads_back(data_dir, tmp_path, one_process):
    cfg = run_config(data_dir)
    ckpt = initial_checkpoint(cfg)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    path = write_single_file(ckpt, tmp_path / "model.safetensors")

    back = read_single_file(path)
    record = CheckpointRecord.from_dict(back.meta, where=str(path))
    assert (record.step, record.consumed_samples, record.metric) == (0, 0, None)
    assert record.task_map == manifest["task_map"] and record.languages == manifest["languages"]
    assert record.tokenizer_sha256 == manifest["tokenizer"]["sha256"] == hashlib.sha256(back.tokenizer).hexdigest()
    model_cfg = ModelConfig.from_record(record.model_config)
    assert record.model_config == to_dict(setup.resolve_model_config(cfg, setup.load_corpus(cfg), 1))
    assert (model_cfg.moe.num_experts, model_cfg.moe.encoder.mode, model_cfg.moe.decoder.task_source) == (
        4, "task", "target_language")
    assert record.parallel == to_dict(cfg.parallel)
    rebuilt = weights(model_from_full(back))
    assert rebuilt.keys() == ckpt.state.keys()
    assert all(torch.equal(rebuilt[k], ckpt.state[k]) for k in rebuilt)
    initial = {k: v.clone() for k, v in ckpt.state.items()}

    other_seed = initial_checkpoint(run_config(data_dir, seed=8)).state
    assert not torch.equal(other_seed["embedding.word_embeddings.weight"], initial["embedding.word_embeddings.weight"])

    # what pretrain_mt.py builds for the same config (process groups, model, DDP, optimizer) at step 0
    groups.destroy()
    groups.init_distributed(rank=0, world_size=1, master_port=groups.free_port())
    trained_from = weights(setup.build(cfg, model_cfg).module)
    assert trained_from.keys() == initial.keys()
    different = [k for k in initial if not torch.equal(trained_from[k], initial[k])]
    assert not different, different[:5]


def test_load_checkpoint_serves_a_single_file(data_dir, tmp_path, one_process):
    ckpt = initial_checkpoint(run_config(data_dir))
    path = write_single_file(ckpt, tmp_path / "model.safetensors")
    loaded = load_checkpoint(path, device="cpu")
    assert (loaded.checkpoint, loaded.step, loaded.languages) == (path, 0, ckpt.meta["languages"])
    assert loaded.directions == sorted(ckpt.meta["task_map"]["direction_to_task"])
    assert loaded.tokenizer.sha256() == ckpt.meta["tokenizer_sha256"]
    assert loaded.tokenizer.model_bytes() == ckpt.tokenizer
    state = weights(loaded.model)
    assert all(torch.equal(state[k], ckpt.state[k]) for k in ckpt.state)
    out = Translator(loaded, TranslatorConfig(beam_size=2, max_len_a=0.0, max_len_b=5)).translate(
        ["the dog sees a cat"], "en", "de")
    assert len(out) == 1 and isinstance(out[0], str)

    # the tokenizer: another one is refused by its hash; the file's own copy is what loads by default
    other = tmp_path / "other.model"
    other.write_bytes(ckpt.tokenizer + b"\0")
    with pytest.raises(CheckpointError, match="differs from the tokenizer the model was trained with|not a sentence"):
        load_checkpoint(path, device="cpu", tokenizer=other)
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="broken.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path / "broken.safetensors", device="cpu")


@pytest.mark.parametrize("system", ["kudugunta_target", "moe_task_shared_dynamic", "dense"])
def test_a_single_file_streams_into_the_model(data_dir, tmp_path, one_process, system):
    """model_from_single_file = model_from_full(read_single_file(...)), a chunk at a time (chunks of one tensor and
    of the default size); write_single_file writes a model's own tensors without copying them."""
    ckpt = initial_checkpoint(run_config(data_dir, system=system))
    path = write_single_file(ckpt, tmp_path / "model.safetensors")
    whole = weights(model_from_full(read_single_file(path)))
    for chunk_bytes in (1, 1 << 28):
        streamed = weights(model_from_single_file(path, chunk_bytes=chunk_bytes))
        assert streamed.keys() == whole.keys() == ckpt.state.keys()
        assert all(torch.equal(streamed[k], whole[k]) and torch.equal(whole[k], ckpt.state[k]) for k in whole)

    # a file whose weights do not fit its record: refused naming the file before any weight is read
    state = dict(ckpt.state)
    state.pop(next(k for k in state if "linear_fc1" in k))
    bad = write_single_file(FullCheckpoint(state=state, meta=ckpt.meta, tokenizer=ckpt.tokenizer),
                            tmp_path / "b.safetensors")
    with pytest.raises(CheckpointToolError, match="b.safetensors: the weights do not fit the model config: missing 1"):
        model_from_single_file(bad)
