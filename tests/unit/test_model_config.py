"""Model/parallel config validation, the conversion to megatron's TransformerConfig, and the presets."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron_taskmoe.config_io import to_dict
from megatron_taskmoe.model import presets
from megatron_taskmoe.model.config import ModelConfig, ParallelConfig, to_transformer_config
from megatron_taskmoe.model.moe_config import MoEConfig, RoutingConfig


def test_model_config_rejects_bad_values_with_the_option_name():
    with pytest.raises(ValueError, match=r"ModelConfig.hidden_size=30 is not divisible by num_attention_heads=4"):
        presets.tiny(hidden_size=30)
    with pytest.raises(ValueError, match=r"ModelConfig.dropout=1.5"):
        presets.tiny(dropout=1.5)
    with pytest.raises(ValueError, match=r"ModelConfig.activation='tanh'"):
        presets.tiny(activation="tanh")
    with pytest.raises(ValueError, match="bias=True with MoE layers"):
        replace(presets.moe_token(presets.tiny()), bias=True)


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        (ParallelConfig(tensor=3), None, r"num_attention_heads=4 is not divisible by ParallelConfig.tensor=3"),
        (ParallelConfig(expert=3), None, r"MoEConfig.num_experts=4 is not divisible by ParallelConfig.expert=3"),
        (ParallelConfig(pipeline=2), None, r"encoder_pipeline_stages must be in \[1, 1\]"),
        (ParallelConfig(pipeline=4, encoder_pipeline_stages=1), None,
         r"decoder_layers=2 are not divisible by their pipeline stages 1 / 3"),
        (ParallelConfig(tensor=2), 3,
         r"world size 3 is not divisible by ParallelConfig.tensor x ParallelConfig.pipeline = 2 x 1"),
        (ParallelConfig(expert=4, expert_tensor=1), 2,
         r"ParallelConfig.expert x expert_tensor = 4 x 1 must divide data x tensor parallel = 2 x 1"),
        (ParallelConfig(tensor=2, sequence_parallel=False), None, "requires sequence parallelism for MoE"),
    ],
)
def test_parallel_config_validation(parallel, world, message):
    with pytest.raises(ValueError, match=message):
        parallel.validate(presets.moe_token(presets.tiny()), world)


def test_parallel_config_accepts_valid_layouts():
    model = presets.moe_token(presets.tiny())
    ParallelConfig(tensor=2, expert=2).validate(model, 4)
    ParallelConfig(pipeline=2, encoder_pipeline_stages=1).validate(model, 2)
    assert ParallelConfig(tensor=2).use_sequence_parallel
    assert not ParallelConfig().use_sequence_parallel
    with pytest.raises(ValueError, match="expert=2 > 1 but the model has no MoE layers"):
        ParallelConfig(expert=2).validate(presets.tiny())


def test_padded_vocab_is_the_same_for_every_tensor_parallel_size_that_divides_the_multiple():
    cfg = presets.tiny(vocab_size=250, vocab_pad_multiple=8)
    assert cfg.padded_vocab_size(1) == cfg.padded_vocab_size(2) == cfg.padded_vocab_size(4) == 256
    assert cfg.padded_vocab_size(3) == 264


def test_to_transformer_config_maps_sizes_numerics_and_moe_fields():
    cfg = replace(presets.moe_token(presets.tiny()), activation="gelu", normalization="RMSNorm")
    cfg = replace(cfg, moe=replace(cfg.moe, capacity_factor=1.25, z_loss_coeff=1e-3, token_dispatcher="allgather"))
    tc = to_transformer_config(cfg, ParallelConfig(tensor=2, expert=2))
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size, tc.num_attention_heads) == (4, 32, 64, 4)
    assert tc.activation_func is F.gelu and not tc.gated_linear_unit and tc.normalization == "RMSNorm"
    assert tc.tensor_model_parallel_size == 2 and tc.expert_model_parallel_size == 2 and tc.sequence_parallel
    assert tc.use_cpu_initialization and not tc.gradient_accumulation_fusion and not tc.bias_dropout_fusion
    assert not tc.masked_softmax_fusion and not tc.persist_layer_norm and not tc.apply_rope_fusion
    assert tc.num_moe_experts == 4 and tc.moe_router_topk == 2
    assert tc.moe_expert_capacity_factor == 1.25 and tc.moe_z_loss_coeff == 1e-3
    assert tc.moe_token_dispatcher_type == "allgather" and tc.moe_aux_loss_coeff == 1e-2
    assert tc.moe_router_load_balancing_type == "aux_loss"
    dense = to_transformer_config(presets.tiny())
    assert dense.num_moe_experts is None and not dense.sequence_parallel


def test_moe_placement_is_per_side():
    cfg = presets.moe_token(presets.tiny(encoder_layers=4, decoder_layers=3))
    cfg = replace(cfg, moe=replace(cfg.moe, encoder=RoutingConfig(layer_freq=1), decoder=RoutingConfig(layer_freq=2)))
    assert cfg.moe_pattern("encoder") == [1, 1, 1, 1]
    assert cfg.moe_pattern("decoder") == [1, 0, 1]
    assert cfg.num_moe_layers() == 6
    assert presets.tiny().moe_pattern("decoder") == [0, 0]


def test_presets_set_the_papers_systems():
    base = presets.paper_base()
    assert (base.encoder_layers, base.decoder_layers, base.hidden_size, base.ffn_hidden_size) == (12, 12, 1024, 4096)
    assert base.num_attention_heads == 16 and base.dropout == 0.3 and base.moe is None
    tb = presets.transformer_base()
    assert (tb.encoder_layers, tb.decoder_layers, tb.hidden_size, tb.ffn_hidden_size, tb.num_attention_heads,
            tb.dropout) == (6, 6, 512, 2048, 8, 0.1)
    systems = {name: presets.get(name, num_tasks=6, num_languages=4) for name in presets.SYSTEMS}
    assert systems["dense"].moe is None
    # Pham et al.: every FFN an MoE layer of 8 experts, top-2
    for name in ("moe_token", "moe_sentence", "moe_task_static", "moe_task_dynamic", "moe_task_shared_dynamic",
                 "moe_token_adapters_static", "moe_token_adapters_dynamic"):
        moe = systems[name].moe
        assert (moe.num_experts, moe.topk, moe.encoder.layer_freq, moe.decoder.layer_freq) == (8, 2, 1, 1), name
        assert systems[name].num_moe_layers() == 24, name
    token = systems["moe_token"].moe
    assert (token.encoder.mode, token.decoder.mode, token.num_tasks, token.num_languages) == ("token", "token", 6, 4)
    assert systems["moe_sentence"].moe.encoder.mode == systems["moe_sentence"].moe.decoder.mode == "sentence"
    # Table 3's three "MoE + Task" rows route the MoE by task; only the adapters (and the sharing) differ
    for name, adapters in (("moe_task_static", "static"), ("moe_task_dynamic", "dynamic"),
                           ("moe_task_shared_dynamic", "shared_dynamic")):
        moe = systems[name].moe
        assert moe.encoder.mode == moe.decoder.mode == "task_token", name
        assert (moe.adapters.mode, moe.adapters.hidden_size, moe.adapters.task_embed_dim) == (adapters, 256, 64), name
    for name in ("moe_token_adapters_static", "moe_token_adapters_dynamic"):
        assert systems[name].moe.encoder.mode == "token", name
    for name in ("dense_task_static", "dense_task_dynamic"):
        moe = systems[name].moe
        assert (moe.num_experts, moe.topk, moe.aux_loss_coeff) == (1, 1, 0.0), name
        assert moe.adapters.mode == name.rsplit("_", 1)[1] and moe.encoder.mode == "token", name
        assert systems[name].num_moe_layers() == 24, name
    # Kudugunta et al.: alternate layers, 32 experts, routing per side
    for name, enc, dec in (("kudugunta_token", ("token", "task"), ("token", "task")),
                           ("kudugunta_pair", ("task", "task"), ("task", "task")),
                           ("kudugunta_target", ("task", "target_language"), ("task", "target_language")),
                           ("token_enc_pair_dec", ("token", "task"), ("task", "task")),
                           ("token_enc_task_dec", ("token", "task"), ("task", "target_language"))):
        moe = systems[name].moe
        assert (moe.num_experts, moe.topk, moe.encoder.layer_freq) == (32, 2, 2), name
        assert (moe.encoder.mode, moe.encoder.task_source) == enc and (moe.decoder.mode, moe.decoder.task_source) == dec
    kudugunta = presets.get("token_enc_task_dec", "transformer_base", num_tasks=6, num_languages=4)
    assert kudugunta.num_moe_layers() == 6 and kudugunta.hidden_size == 512
    for name, cfg in systems.items():
        assert cfg.hidden_size == 1024, name
    for name in presets.SYSTEMS:
        cfg = presets.get(name, "tiny")
        assert cfg.hidden_size == 32 and (cfg.moe is None or cfg.moe.num_experts in (1, 4)), name
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        presets.get("nope")
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        presets.get("dense", "huge")
    assert isinstance(presets.get("tiny", vocab_size=99), ModelConfig)
    assert isinstance(token, MoEConfig)


def test_initialisation_is_a_model_choice():
    import math

    from megatron_taskmoe.model.config import RECORD_DEFAULTS, xavier_uniform_init

    cfg = presets.tiny()
    assert (cfg.init_method, cfg.scale_embedding, cfg.embedding_scale) == ("xavier_uniform", True, math.sqrt(32))
    tc = to_transformer_config(cfg)
    assert tc.init_method is xavier_uniform_init and tc.output_layer_init_method is xavier_uniform_init
    table = torch.empty(4000, 32)
    tc.embedding_init_method(table)
    assert abs(float(table.std()) - 32 ** -0.5) < 0.01
    weight = torch.empty(96, 32)
    xavier_uniform_init(weight)
    bound = math.sqrt(6 / (96 + 32))
    assert float(weight.abs().max()) <= bound and float(weight.abs().max()) > 0.9 * bound
    bias = torch.ones(7)
    assert torch.equal(xavier_uniform_init(bias), torch.zeros(7))
    legacy = to_transformer_config(replace(cfg, init_method="normal", init_std=0.03))
    assert legacy.init_method_std == 0.03 and legacy.init_method is not xavier_uniform_init
    with pytest.raises(ValueError, match="init_method='kaiming'"):
        presets.tiny(init_method="kaiming")
    # a record written before these fields existed describes a model built with megatron's recipe, unscaled
    record = to_dict(presets.tiny())
    for key in RECORD_DEFAULTS:
        del record[key]
    old = ModelConfig.from_record(record)
    assert (old.init_method, old.scale_embedding, old.embedding_scale) == ("normal", False, 1.0)
    assert ModelConfig.from_record(to_dict(cfg)) == cfg
