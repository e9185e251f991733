"""A checkpoint saved by a 2-process run (`torchrun --nproc-per-node 2 pretrain_mt.py`, EP=2 or TP=2 with sequence
parallelism) loads into one process (TP=PP=EP=1): the recomputed per-direction validation loss equals what the
2-process model logged at the same step within 1e-5, and the greedy translations equal the ones the model gives
after loading the same checkpoint into one process twice (loading is deterministic)."""

import pytest
import torch

from megatron_taskmoe.inference import Translator, TranslatorConfig, load_checkpoint
from megatron_taskmoe.parallel import groups
from tests.helpers import tiny_run

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    yield tmp_path_factory.mktemp("tiny")
    if torch.distributed.is_initialized():
        groups.destroy()


@pytest.mark.parametrize("layout", ["parallel.expert=2", "parallel.tensor=2"])
def test_two_process_checkpoint_loads_into_one_process(root, layout):
    run_dir = tiny_run.train(root, root / layout.replace("=", "").replace(".", "_"), steps=12, nproc=2,
                             overrides=(layout,))
    loaded = load_checkpoint(run_dir, device="cpu")
    assert loaded.meta["parallel"][layout.split("=")[0].split(".")[1]] == 2
    logged = [m for m in tiny_run.metrics(run_dir) if m["kind"] == "eval"][-1]
    assert logged["step"] == loaded.step == 12
    got = tiny_run.validation_losses(loaded.model, root / "bin", max_sentences=8, model_config=loaded.model_config)
    assert set(got) == set(logged["loss"])
    for direction, want in logged["loss"].items():
        assert abs(got[direction] - want) < 1e-5, (layout, direction, got[direction], want)
    # the expert weights arrived whole: 4 experts in the one-process model, all different
    experts = [p for n, p in loaded.model.named_parameters()
               if "encoder.layers.0.mlp.experts.local_experts" in n and n.endswith("linear_fc1.weight")]
    assert len(experts) == loaded.model_config.moe.num_experts == 4
    assert all(not torch.equal(experts[0], e) for e in experts[1:])
    sentences = (root / "raw" / "test.en-de.en").read_text().splitlines()[:6]
    first = Translator(loaded, TranslatorConfig(beam_size=1)).translate(sentences, "en", "de")
    again = Translator(load_checkpoint(run_dir, device="cpu"), TranslatorConfig(beam_size=1))
    assert again.translate(sentences, "en", "de") == first
