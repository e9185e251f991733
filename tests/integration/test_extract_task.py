"""tools/checkpoint/extract_task.py: a task's sub-network (Kudugunta et al. 2021) from a tiny token_enc_task_dec
checkpoint trained by pretrain_mt.py in the test (token-routed encoder, decoder routed by target language).

  * extracting the target language de keeps the decoder's top-2 of 4 experts, the en/de rows of the language table
    and the x-de directions: parameter count = the formula; logits on en-de batches equal to the full model's;
    greedy and beam translations identical through `inference.Translator`; translate.py serves en-de with the full
    model's output and the loaded sub-network refuses de-en; the Table-1 report is printed and written beside it;
  * the other routing cases on random weights, in process: raw top-1 probabilities (folded into the experts),
    task routing on both sides with static adapters (one adapter kept), dynamic adapters (all kept);
  * bad input (unknown task or target language, an existing output, a token-routed model) exits 2 naming the
    option and writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_taskmoe.parallel import groups
from tests.helpers import tiny_run
from tests.helpers.corpus import run_tool

TOOL = "tools/checkpoint/extract_task.py"
SENTENCES = ["the dog sees a cat", "a big red house", "the old man has a small dog and a cat"]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    _, run_dir = tiny_run.shared_run(tmp_path_factory, steps=20, overrides=(
        "model.system=token_enc_task_dec", "eval.interval=0"))
    out = tmp_path_factory.mktemp("extract") / "de"
    r = run_tool(TOOL, str(run_dir / "checkpoints"), str(out), "--target-lang", "de", "--verify")
    assert r.returncode == 0, r.stderr[-3000:]
    yield run_dir, out, r.stdout
    if torch.distributed.is_initialized():  # load_checkpoint made a one-process group; leave none behind
        groups.destroy()


@pytest.fixture(scope="module")
def models(extracted):
    from megatron_taskmoe.inference import load_checkpoint

    run_dir, out, _ = extracted
    return load_checkpoint(run_dir, device="cpu"), load_checkpoint(out, device="cpu")


def _count(model) -> int:
    return sum(p.numel() for p in model.state_dict().values() if isinstance(p, torch.Tensor))


def test_extracted_model_is_the_expected_size_and_records_the_kept_tasks(extracted, models):
    _, out, stdout = extracted
    full, sub = models
    cfg = full.model_config
    moe = cfg.moe
    assert (moe.encoder.mode, moe.decoder.mode, moe.decoder.task_source) == ("token", "task", "target_language")
    assert sub.task_map["direction_to_task"] == {"en-de": 0} and sub.languages == ["de", "en"]
    assert sub.model_config.moe.decoder.num_experts == moe.topk and sub.model_config.moe.encoder.num_experts is None
    expert = 2 * cfg.hidden_size * (moe.expert_ffn_hidden_size or cfg.ffn_hidden_size)
    removed_experts = moe.num_experts - moe.topk
    decoder_moe_layers = sum(cfg.moe_pattern("decoder"))
    c = moe.decoder.task_embed_dim
    expected = (_count(full.model) - decoder_moe_layers * removed_experts * (expert + c)
                - (len(full.languages) - len(sub.languages)) * c * decoder_moe_layers)
    assert _count(sub.model) == expected < _count(full.model)

    report = json.loads(Path(f"{out}.extract.json").read_text())
    params = report["parameters"]
    assert params["serve_extracted"]["total"] == expected and params["train_all_tasks"]["total"] == _count(full.model)
    assert params["train_all_tasks"]["active_per_token"] == _count(full.model) - removed_experts * expert * (
        sum(cfg.moe_pattern("encoder")) + decoder_moe_layers)
    assert report["verify"]["max_abs_logit_difference"] <= 1e-5
    assert "Train All" in stdout and f"{expected:,}" in stdout
    decoder_layers = [layer for layer in report["layers"] if layer["layer"].startswith("decoder")]
    assert [len(layer["kept"]) for layer in decoder_layers] == [moe.topk] * decoder_moe_layers
    assert sub.meta["extracted"]["kept"]["directions"] == ["en-de"]


def test_extracted_logits_and_translations_equal_the_full_models(models):
    from megatron_taskmoe.checkpoint_tools.extract import direction_batch
    from megatron_taskmoe.checkpoint_tools.full import FullCheckpoint
    from megatron_taskmoe.checkpoint_tools.verify import model_logits
    from megatron_taskmoe.inference import Translator, TranslatorConfig

    full, sub = models
    batch_full, batch_sub = direction_batch(FullCheckpoint(state={}, meta=full.meta),
                                            FullCheckpoint(state={}, meta=sub.meta))
    assert batch_full["task_ids"].tolist() != batch_sub["task_ids"].tolist()  # two id spaces, one direction
    diff = (model_logits(full.model, batch_full) - model_logits(sub.model, batch_sub)).abs().max()
    assert float(diff) <= 1e-5
    # another direction's ids route the full model elsewhere: the check above can fail
    other = dict(batch_full, tgt_lang_ids=torch.full_like(batch_full["tgt_lang_ids"], full.languages.index("fr")))
    assert float((model_logits(full.model, other) - model_logits(sub.model, batch_sub)).abs().max()) > 1e-3
    for beam in (1, 3):
        config = TranslatorConfig(beam_size=beam, max_len_b=5)
        want = Translator(full, config).translate_ids(SENTENCES, "en", "de")
        got = Translator(sub, config).translate_ids(SENTENCES, "en", "de")
        assert got == want and any(want)


def test_translate_tool_serves_only_the_kept_directions(extracted, models, tmp_path):
    from megatron_taskmoe.inference import CheckpointError, Translator, TranslatorConfig

    _, out, _ = extracted
    src = tmp_path / "in.en"
    src.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    r = run_tool("tools/translate.py", "--checkpoint", str(out), "--source-lang", "en", "--target-lang", "de",
                 "--input", str(src), "--beam", "1", "--max-len-b", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    full, sub = models
    assert r.stdout.splitlines() == Translator(full, TranslatorConfig(beam_size=1, max_len_b=5)).translate(
        SENTENCES, "en", "de")
    with pytest.raises(CheckpointError, match="direction de-en was not trained"):
        Translator(sub).translate(SENTENCES, "de", "en")


def _tool(argv, capsys) -> tuple[int, str]:
    import importlib.util

    from megatron_taskmoe.checkpoint_tools.cli import run

    spec = importlib.util.spec_from_file_location("extract_task", Path(tiny_run.ROOT, TOOL))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = run(lambda: module.main([str(a) for a in argv]), "extract_task.py")
    return code, capsys.readouterr().err


def test_bad_inputs_exit_2_naming_the_option_and_write_nothing(extracted, models, tmp_path, capsys):
    from megatron_taskmoe.checkpoint_tools.full import FullCheckpoint
    from megatron_taskmoe.checkpoint_tools.single_file import write_single_file
    from megatron_taskmoe.config_io import to_dict
    from megatron_taskmoe.model import presets

    run_dir, out, _ = extracted
    target = tmp_path / "out"
    code, err = _tool([run_dir, target, "--task", "xx-yy"], capsys)
    assert code == 2 and "--task xx-yy: not a task or direction" in err and "en-de" in err
    code, err = _tool([run_dir, target, "--target-lang", "ru"], capsys)
    assert code == 2 and "--target-lang ru" in err
    code, err = _tool([run_dir, out, "--target-lang", "de"], capsys)
    assert code == 2 and "already exists" in err
    code, err = _tool([run_dir, target], capsys)
    assert code == 2 and "--task" in err and "--target-lang" in err

    full, _ = models  # a token-routed model with the same record: nothing is task-routed
    cfg = presets.moe_token(full.model_config)
    from megatron_taskmoe.checkpoint_tools.models import build_model

    state = {k: torch.zeros_like(v) for k, v in build_model(cfg).state_dict().items() if isinstance(v, torch.Tensor)}
    token_only = write_single_file(FullCheckpoint(state=state, meta={**full.meta, "model_config": to_dict(cfg)},
                                                  tokenizer=None), tmp_path / "token.safetensors")
    code, err = _tool([token_only, target, "--target-lang", "de"], capsys)
    assert code == 2 and "nothing to extract" in err and "'token'" in err
    assert not target.exists() and not list(tmp_path.glob(".*")) and not list(tmp_path.glob("*.json"))


def _random(cfg):
    from megatron_taskmoe.checkpoint.process_groups import one_process_groups
    from megatron_taskmoe.checkpoint_tools.full import FullCheckpoint
    from megatron_taskmoe.config_io import to_dict
    from megatron_taskmoe.model.config import ParallelConfig, to_transformer_config
    from megatron_taskmoe.model.encdec import EncoderDecoderModel

    pg = one_process_groups()
    torch.manual_seed(0)
    model = EncoderDecoderModel(cfg, ParallelConfig(), pg_collection=pg,
                                transformer_config=to_transformer_config(cfg, ParallelConfig()))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    meta = {"model_config": to_dict(cfg), "languages": ["de", "en", "fr"],
            "task_map": {"mode": "direction", "tasks": ["de-en", "en-de", "en-fr", "fr-en"],
                         "direction_to_task": {"de-en": 0, "en-de": 1, "en-fr": 2, "fr-en": 3}}}
    return FullCheckpoint(state=state, meta=meta, source="random")


@pytest.mark.parametrize("case", ["top1", "task_both_static", "task_both_dynamic"])
def test_other_routing_cases_keep_the_logits(case, extracted):
    from megatron_taskmoe.checkpoint_tools.extract import extract, max_logit_difference
    from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
    from megatron_taskmoe.model import presets
    from megatron_taskmoe.model.moe_config import AdapterConfig

    cfg = presets.get("token_enc_task_dec", "tiny", num_tasks=4, num_languages=3)
    moe = replace(cfg.moe, decoder=replace(cfg.moe.decoder, layer_freq=1))
    if case == "top1":
        moe = replace(moe, topk=1)
    else:
        moe = replace(moe, encoder=replace(moe.encoder, mode="task"),
                      adapters=AdapterConfig(mode=case.rsplit("_", 1)[1], task_embed_dim=8, hidden_size=16))
    full = _random(replace(cfg, moe=moe))
    sub, report = extract(full, tasks=["en-fr"])
    assert max_logit_difference(full, sub) <= 1e-5
    counts = report["parameters"]
    assert counts["serve_extracted"]["total"] < counts["train_all_tasks"]["total"]
    layers = {layer["layer"]: layer for layer in report["layers"]}
    assert layers["decoder.layers.1.mlp"]["experts_after"] == moe.topk
    if case == "top1":
        assert 0 < layers["decoder.layers.0.mlp"]["output_scale"] < 1
        with pytest.raises(CheckpointToolError, match="extract one target language at a time"):
            extract(full, tasks=["en-fr", "de-en"])
    else:
        assert layers["encoder.layers.0.mlp"]["experts_after"] == moe.topk
        adapters = [k for k in sub.state if k.endswith("adapters.down_ADH")]
        rows = {k: sub.state[k].shape[0] for k in adapters}
        assert set(rows.values()) == ({1} if case.endswith("static") else {2}), rows
        two, _ = extract(full, tasks=["en-fr", "de-en"])  # union of two tasks' experts, padded per side
        assert max_logit_difference(full, two) <= 1e-5


@pytest.mark.parametrize("drop_policy", ["probs", "position"])
def test_capacity_models_drop_the_same_tokens(drop_policy):
    from megatron_taskmoe.checkpoint_tools.extract import extract, max_logit_difference
    from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError, FullCheckpoint
    from megatron_taskmoe.config_io import to_dict
    from megatron_taskmoe.model import presets

    cfg = presets.get("token_enc_task_dec", "tiny", num_tasks=4, num_languages=3)
    # eval_capacity_factor: the logits compared below are evaluation-mode ones, which drop nothing by default
    moe = replace(cfg.moe, decoder=replace(cfg.moe.decoder, layer_freq=1), capacity_factor=1.0,
                  eval_capacity_factor=1.0, drop_policy=drop_policy)
    full = _random(replace(cfg, moe=moe))
    for tasks in (["en-fr", "de-en"], ["en-fr"]):
        sub, report = extract(full, tasks=tasks)
        sub_cfg = sub.model_config()
        assert sub_cfg.moe.decoder.capacity_num_experts == moe.num_experts
        assert sub_cfg.moe.decoder.num_experts == 2 or len(tasks) > 1
        assert sub_cfg.moe.encoder.capacity_num_experts is None  # token-routed: all experts kept
        assert max_logit_difference(full, sub) <= 1e-5
    # The capacity binds on this batch (task routing sends every token to the same k experts): computed from the
    # sub-network's own expert count it would drop fewer tokens and change the logits.
    own_count = replace(sub_cfg, moe=replace(sub_cfg.moe, decoder=replace(sub_cfg.moe.decoder,
                                                                          capacity_num_experts=None)))
    wrong = FullCheckpoint(state=sub.state, meta={**sub.meta, "model_config": to_dict(own_count)}, source="wrong")
    assert max_logit_difference(full, wrong) > 1e-3
    padded = _random(replace(cfg, moe=replace(moe, pad_to_capacity=True)))
    with pytest.raises(CheckpointToolError, match="pad_to_capacity=True"):
        extract(padded, tasks=["en-fr"])


def test_per_side_expert_count_is_validated_and_reaches_megatron():
    from megatron_taskmoe.model import presets
    from megatron_taskmoe.model.config import ParallelConfig, side_transformer_config, to_transformer_config
    from megatron_taskmoe.model.moe_config import RoutingConfig

    cfg = presets.get("token_enc_task_dec", "tiny")
    with pytest.raises(ValueError, match=r"MoEConfig.topk=2 exceeds MoEConfig.decoder.num_experts=1"):
        replace(cfg.moe, decoder=replace(cfg.moe.decoder, num_experts=1))
    with pytest.raises(ValueError, match=r"RoutingConfig.num_experts=0 must be a positive integer"):
        RoutingConfig(num_experts=0)
    sub = replace(cfg, moe=replace(cfg.moe, decoder=replace(cfg.moe.decoder, num_experts=3)))
    with pytest.raises(ValueError, match=r"MoEConfig.decoder.num_experts=3 is not divisible by ParallelConfig.expe"):
        ParallelConfig(expert=2).validate(sub)
    tconfig = to_transformer_config(sub)
    assert side_transformer_config(tconfig, sub, "encoder") is tconfig
    decoder = side_transformer_config(tconfig, sub, "decoder")
    assert (decoder.num_moe_experts, tconfig.num_moe_experts, sub.moe.side_num_experts("decoder")) == (3, 4, 3)
