"""Model/parallel config validation, the conversion to megatron's TransformerConfig, and the presets."""

from dataclasses import replace

import pytest
import torch.nn.functional as F

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
        (ParallelConfig(tensor=2), 3, r"world size 3 is not divisible by tensor x pipeline = 2 x 1"),
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
    systems = {name: presets.get(name, num_tasks=6, num_languages=4) for name in presets.SYSTEMS}
    assert systems["dense"].moe is None
    token = systems["moe_token"].moe
    assert (token.num_experts, token.topk, token.encoder.mode, token.decoder.mode) == (8, 2, "token", "token")
    assert token.encoder.layer_freq == 2 and token.num_tasks == 6 and token.num_languages == 4
    assert systems["moe_sentence"].moe.encoder.mode == systems["moe_sentence"].moe.decoder.mode == "sentence"
    assert systems["moe_task_static"].moe.adapters.mode == "static"
    assert systems["moe_task_static"].moe.adapters.hidden_size == 256
    assert systems["moe_task_dynamic"].moe.adapters.mode == "dynamic"
    shared = systems["moe_task_shared_dynamic"].moe
    assert shared.adapters.mode == "shared_dynamic" and shared.encoder.mode == shared.decoder.mode == "task_token"
    kudugunta = systems["token_enc_task_dec"].moe
    assert kudugunta.encoder.mode == "token"
    assert (kudugunta.decoder.mode, kudugunta.decoder.task_source) == ("task", "target_language")
    for name in ("dense_task_static", "dense_task_dynamic"):
        moe = systems[name].moe
        assert (moe.num_experts, moe.topk, moe.aux_loss_coeff) == (1, 1, 0.0), name
        assert moe.adapters.mode == name.rsplit("_", 1)[1] and moe.encoder.mode == "token", name
    for name, cfg in systems.items():
        assert cfg.hidden_size == 1024, name
    assert presets.get("moe_token", "tiny").hidden_size == 32
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        presets.get("nope")
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        presets.get("dense", "huge")
    assert isinstance(presets.get("tiny", vocab_size=99), ModelConfig)
    assert isinstance(token, MoEConfig)
