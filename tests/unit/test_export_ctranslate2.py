"""tools/checkpoint/export_ctranslate2.py: dense models and task-routed sub-networks as CTranslate2 models.

  * the maths (`serving/dense.py`): a task-routed MoE layer with its gates fixed equals one dense FFN (fc1 rows
    concatenated, fc2 columns scaled by the gate weights), relu / swiglu, top-2 renormalized / top-1 raw;
  * randomly initialised reference models (task routing by pair and by target language on both sides, LayerNorm /
    RMSNorm, relu / gelu / swiglu, biases, dense) converted with CTranslate2's own converter: greedy outputs equal
    the reference MoE model's and teacher-forced token log-probabilities agree within 1e-4 (fp32); two directions
    into one language share a model routed by target language; int8 writes a smaller model whose agreement is
    reported;
  * refusals name the layers (token / sentence / token+task routing, adapters, capacity, directions whose gates
    differ) and write nothing; a failed verification leaves nothing.
Each export is in process from a reference state (no process group). Trained checkpoints and the CLI:
tests/integration/test_export_ctranslate2_checkpoints.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_run

ctranslate2 = pytest.importorskip("ctranslate2")

TOOL = "tools/checkpoint/export_ctranslate2.py"
SENTENCES = tiny_run.sentences("en", 302, 8) + ["the old man has a small dog and a cat"]
TASKS = ["de-en", "en-de", "en-fr", "fr-en"]
LANGUAGES = ["de", "en", "fr"]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    root = tmp_path_factory.getbasetemp() / "tiny_run_shared"
    root.mkdir(exist_ok=True)
    tiny_run.prepare_data(root)
    return root / "spm.model"


def model_config(kind: str, vocab: int):
    from megatron_taskmoe.model import presets

    def moe(cfg, **kw):
        return replace(cfg, moe=replace(cfg.moe, **kw))

    base = presets.get("moe_token", "tiny", num_tasks=len(TASKS), num_languages=len(LANGUAGES), vocab_size=vocab,
                       max_source_positions=40, max_target_positions=40)
    task = dict(mode="task", task_embed_dim=8)
    if kind == "task_by_pair_relu_layernorm":
        return moe(base, encoder=replace(base.moe.encoder, **task), decoder=replace(base.moe.decoder, **task))
    if kind == "task_by_target_swiglu_rmsnorm_top1_raw":
        cfg = replace(base, activation="swiglu", normalization="RMSNorm")  # MoE models have no biases
        side = dict(task, task_source="target_language", layer_freq=1)
        return moe(cfg, topk=1, renormalize_topk=False, capacity_factor=1.0,  # capacity in training only
                   encoder=replace(base.moe.encoder, **side), decoder=replace(base.moe.decoder, **side))
    if kind == "dense_gelu_bias":
        return presets.get("dense", "tiny", vocab_size=vocab, max_source_positions=40, max_target_positions=40,
                           activation="gelu", bias=True, num_tasks=len(TASKS), num_languages=len(LANGUAGES))
    if kind == "token":
        return base
    if kind == "sentence_decoder":
        return moe(base, encoder=replace(base.moe.encoder, **task), decoder=replace(base.moe.decoder, mode="sentence"))
    if kind == "task_token":
        return presets.get("moe_task_shared_dynamic", "tiny", num_tasks=len(TASKS), num_languages=len(LANGUAGES),
                           vocab_size=vocab)
    if kind == "task_capacity_at_inference":
        cfg = model_config("task_by_pair_relu_layernorm", vocab)
        return moe(cfg, capacity_factor=1.0, eval_capacity_factor=1.0)
    if kind == "task_static_adapters":
        from megatron_taskmoe.model.moe_config import AdapterConfig

        cfg = model_config("task_by_pair_relu_layernorm", vocab)
        return moe(cfg, adapters=AdapterConfig(mode="static", task_embed_dim=8, hidden_size=16))
    raise ValueError(kind)


def random_source(tokenizer: Path, kind: str, seed: int = 0):
    """A reference-format model of `kind` with random weights (norms and biases away from 1 / 0)."""
    import hashlib

    import sentencepiece as spm

    from megatron_taskmoe.checkpoint_tools.export import arch_config, language_tags
    from megatron_taskmoe.reference import config as rc
    from megatron_taskmoe.reference.model import ReferenceModel
    from megatron_taskmoe.serving.source import ReferenceSource

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    scaled = kind.endswith("+scaled")
    kind = kind.removesuffix("+scaled")
    cfg = model_config(kind, vocab)
    arch = arch_config(replace(cfg, scale_embedding=scaled))  # token embeddings x sqrt(D) before the positions
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in ReferenceModel(arch).state_dict().items():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("norm.weight") or name.endswith("norm_weight"):
            state[name] = 1.0 + 0.1 * noise
        elif p.dim() == 1 or "task_embedding" in name:
            state[name] = 0.1 * noise if p.dim() == 1 else noise
        else:
            state[name] = noise / p.shape[-1] ** 0.5
    data = tokenizer.read_bytes()
    config = rc.ExportConfig(
        model=arch, task_map={"mode": "direction", "tasks": TASKS,
                              "direction_to_task": {t: i for i, t in enumerate(TASKS)}},
        languages=LANGUAGES, language_tags=language_tags(tokenizer, LANGUAGES),
        special_ids={"pad": 0, "unk": 1, "bos": 2, "eos": 3}, dtype="fp32",
        tokenizer_sha256=hashlib.sha256(data).hexdigest())
    return ReferenceSource(config=config, state=state, tokenizer=data, where=f"random:{kind}")


# ------------------------------------------------------------------------------------------------ the maths
@pytest.mark.parametrize("kind", ["task_by_pair_relu_layernorm", "task_by_target_swiglu_rmsnorm_top1_raw"])
def test_fixed_gate_moe_layer_equals_one_dense_ffn(tokenizer, kind):
    from megatron_taskmoe.reference.model import Ids
    from megatron_taskmoe.serving.dense import dense_ffn_forward, densify

    source = random_source(tokenizer, kind)
    model = source.model()
    moe = source.config.model.moe
    for direction in ("en-de", "fr-en"):
        ids = source.config.direction(*direction.split("-"))
        dense = densify(source.config, source.state, [direction], source.where)
        x_SBD = torch.randn(5, 3, source.config.model.hidden_size, generator=torch.Generator().manual_seed(1))
        padding_SB = torch.zeros(5, 3, dtype=torch.bool)
        for gate in dense.gates:
            side, _, index = gate.layer.split(".")
            assert len(gate.experts) == moe.topk
            if moe.topk == 1 and not moe.renormalize:
                assert 0 < gate.weights[0] < 1  # raw softmax probability, folded into fc2
            layer = getattr(model, side).layers[int(index)].ffn
            want = layer(x_SBD, padding_SB, Ids(torch.full((3,), ids["task_id"]), torch.full((3,), ids["tgt_lang_id"])))
            got = dense_ffn_forward(dense.ffn[gate.layer], x_SBD, source.config.model.activation)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
            width = dense.ffn_width(gate.layer, source.config.model.activation)
            assert width == moe.topk * moe.expert_ffn_hidden_size


# ------------------------------------------------------------------------------------------------ conversions
@pytest.mark.parametrize("kind,directions,quantization", [
    ("task_by_pair_relu_layernorm", {"tasks": ["en-de"]}, "int8"),
    ("task_by_target_swiglu_rmsnorm_top1_raw", {"target_langs": ["en"]}, "float32"),  # de-en, fr-en share gates
    ("dense_gelu_bias", {}, "float32"),
    ("task_by_pair_relu_layernorm+scaled", {"tasks": ["fr-en"]}, "float32"),
])
def test_ctranslate2_reproduces_the_reference_model(tokenizer, tmp_path, kind, directions, quantization):
    from megatron_taskmoe.serving.export import export_source

    source = random_source(tokenizer, kind)
    before = {k: v.clone() for k, v in source.state.items()}
    out = tmp_path / "ct2"
    summary = export_source(source, out, verify=True, verify_sentences=12, tolerance=1e-4,
                            quantization=quantization, **directions)
    assert all(torch.equal(before[k], v) for k, v in source.state.items())  # the conversion copies
    if quantization == "int8":  # checked on a float32 copy; the int8 model's agreement is reported
        int8 = summary["verify"]["quantized"]
        assert int8["sentences"] == 12 and int8["greedy_agreement"] >= 0.5, int8
        assert 0 < int8["max_abs_token_logprob_difference"] < 0.5, int8
        assert json.loads((out / "config.json").read_text()).get("quantization_type", None) is None
    fp32 = summary["verify"]["float32"]
    assert fp32["passed"] and fp32["greedy_different"] == 0, fp32
    assert fp32["greedy_identical"] >= fp32["sentences"] - 1, fp32  # at most one fp32 near-tie
    assert fp32["max_abs_token_logprob_difference"] <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.bin", "shared_vocabulary.json",
                                                     "taskmoe_serving.json", "tokenizer.model"]
    assert not list(tmp_path.glob(".*"))
    record = json.loads((out / "taskmoe_serving.json").read_text())
    want = directions["tasks"] if "tasks" in directions else ["de-en", "fr-en"] if directions else TASKS
    assert sorted(record["directions"]) == want == summary["directions"]
    assert all(v["source_prefix"] == [f"<2{d.split('-')[1]}>"] for d, v in record["directions"].items())
    scale = source.config.model.hidden_size ** 0.5 if kind.endswith("+scaled") else 1.0
    assert record["embedding_scale"] == pytest.approx(scale)
    ct2_config = json.loads((out / "config.json").read_text())
    assert ct2_config["add_source_eos"] is True and ct2_config["decoder_start_token"] == "<s>"
    assert ct2_config["layer_norm_epsilon"] == source.config.model.layernorm_epsilon
    vocabulary = json.loads((out / "shared_vocabulary.json").read_text())
    assert vocabulary == source.pieces() and vocabulary[:4] == ["<pad>", "<unk>", "<s>", "</s>"]
    moe = source.config.model.moe
    if moe is not None:
        assert summary["parameters"]["served"] < summary["parameters"]["source"]
        assert set(summary["gates"]) == {f"{s}.layers.{i}" for s in ("encoder", "decoder")
                                         for i in source.config.model.moe_layers(s)}


def test_ctranslate2_never_produces_pad_bos_unk_or_a_tag(tokenizer, tmp_path):
    import sentencepiece as spm

    from megatron_taskmoe.reference.translator import Exported, ReferenceTranslator
    from megatron_taskmoe.serving import Ct2Translator
    from megatron_taskmoe.serving.export import export_source

    source = random_source(tokenizer, "dense_gelu_bias")
    out = tmp_path / "ct2"
    export_source(source, out, tasks=["en-de"])
    greedy = Ct2Translator(out, beam_size=1, max_len_b=5)
    banned = {0, 1, 2, *source.config.language_tags.values()}
    assert set(greedy.banned) == banned and len(banned) == 6
    # this random model prefers <s> at many steps: CTranslate2 on its own produces it
    plain = greedy.translator.translate_batch(greedy.source_tokens(greedy.sp.encode(SENTENCES), "en", "de"),
                                              beam_size=1, max_decoding_length=20, min_decoding_length=0)
    assert sum("<s>" in r.hypotheses[0] for r in plain) >= 2
    got = greedy.translate_ids(SENTENCES, "en", "de")
    beam = Ct2Translator(out, beam_size=4, max_len_b=5).translate_ids(SENTENCES, "en", "de")
    for ids in got + beam:
        assert ids and not set(ids) & banned, ids
    assert all(greedy.translate(SENTENCES, "en", "de"))
    # like for like with our decoder (the same rule): the same greedy outputs
    sp = spm.SentencePieceProcessor(model_proto=source.tokenizer)
    ours = ReferenceTranslator(Exported(model=source.model(), config=source.config, tokenizer=sp, directory=out),
                               beam_size=1, max_len_b=5)
    assert got == ours.translate_ids(SENTENCES, "en", "de")


def test_directions_whose_gates_differ_are_refused(tokenizer, tmp_path):
    from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
    from megatron_taskmoe.serving.dense import NotDenseError
    from megatron_taskmoe.serving.export import export_source

    source = random_source(tokenizer, "task_by_pair_relu_layernorm")
    with pytest.raises(NotDenseError, match=r"encoder\.layers\.\d: directions de-en and fr-en route to different "):
        export_source(source, tmp_path / "out", target_langs=["en"])
    with pytest.raises(CheckpointToolError, match="--task xx-yy: not a task or direction of random:.* en-de"):
        export_source(source, tmp_path / "out", tasks=["xx-yy"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind,message", [
    ("token", r"encoder\.layers\.0, encoder\.layers\.1: 4 experts that route each token by its own representation"
              r".*decoder\.layers\.0, decoder\.layers\.1: 4 experts"),
    ("sentence_decoder", r"decoder\.layers\.0, decoder\.layers\.1: 4 experts that route each sentence"),
    ("task_token", r"representation concatenated with the task embedding.*shared_dynamic task adapters"),
    ("task_capacity_at_inference", r"a capacity factor of 1\.0 at inference .*experts drop tokens"),
    ("task_static_adapters", r"encoder\.layers\.0, encoder\.layers\.1, decoder\.layers\.0, decoder\.layers\.1: "
                             r"static task adapters"),
])
def test_layers_without_a_dense_form_are_refused_by_name(tokenizer, tmp_path, kind, message):
    from megatron_taskmoe.serving.dense import NotDenseError
    from megatron_taskmoe.serving.export import export_source

    with pytest.raises(NotDenseError, match=message):
        export_source(random_source(tokenizer, kind), tmp_path / "out", tasks=["en-de"], verify=True)
    assert not list(tmp_path.iterdir())


def test_failed_verification_writes_nothing(tokenizer, tmp_path, monkeypatch):
    from megatron_taskmoe.serving import export as export_module

    real = export_module.verify

    def broken(*args, **kwargs):  # as if CTranslate2 disagreed on one sentence
        result = real(*args, **kwargs)
        result["float32"].update(passed=False, greedy_different=1)
        return result

    monkeypatch.setattr(export_module, "verify", broken)
    with pytest.raises(export_module.ExportVerificationError, match=r"1 of 4 greedy outputs differ.*nothing written"):
        export_module.export_source(random_source(tokenizer, "dense_gelu_bias"), tmp_path / "out", verify=True,
                                    verify_sentences=1, quantization="int8")
    assert not list(tmp_path.iterdir())
