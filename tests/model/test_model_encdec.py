"""The encoder-decoder model on one process: shapes, masks, causality, loss/logits agreement, incremental
decoding, every preset forward and backward, and megatron's aux-loss bookkeeping per layer."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron_taskmoe.compat import aux_losses
from megatron_taskmoe.model import presets
from megatron_taskmoe.model.encdec import EncoderDecoderModel
from megatron_taskmoe.parallel import groups

V = 250  # the tiny table is padded to 256 rows: the loss must ignore the padded ones


def build(cfg, seed=0):
    groups.model_parallel_manual_seed(seed)
    return EncoderDecoderModel(cfg)


def system(name, **moe_overrides):
    """A tiny preset with V pieces and every FFN an MoE layer (so every layer routes)."""
    cfg = presets.get(name, "tiny", num_tasks=3, num_languages=4, vocab_size=V)
    if cfg.moe is None:
        return cfg
    return replace(cfg, moe=replace(cfg.moe, encoder=replace(cfg.moe.encoder, layer_freq=1),
                                    decoder=replace(cfg.moe.decoder, layer_freq=1), **moe_overrides))


def batch(B=3, S=7, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (B, S), generator=g)
    tgt = torch.randint(4, V, (B, T), generator=g)
    labels = torch.randint(4, V, (B, T), generator=g)
    src_mask = torch.zeros(B, S, dtype=torch.bool)
    src_mask[1, 5:] = True
    tgt_mask = torch.zeros(B, T, dtype=torch.bool)
    tgt_mask[2, 3:] = True
    src[src_mask], tgt[tgt_mask], labels[tgt_mask] = 0, 0, 0
    return dict(src_tokens=src, src_padding_mask=src_mask, tgt_input=tgt, tgt_padding_mask=tgt_mask, labels=labels,
                loss_mask=(~tgt_mask).float(), task_ids=torch.tensor([0, 1, 2][:B] * (B // 3 + 1))[:B],
                src_lang_ids=torch.arange(B) % 4, tgt_lang_ids=(torch.arange(B) + 1) % 4)


def tiny_moe():
    return system("moe_token")


def test_loss_shape_padding_and_agreement_with_logits(megatron_world1):
    cfg = presets.tiny(vocab_size=V)
    assert cfg.padded_vocab_size() > V
    model = build(cfg).eval()
    b = batch()
    loss = model(**b)
    assert loss.shape == (3, 5)
    assert torch.all(loss[b["tgt_padding_mask"]] == 0) and torch.all(loss[~b["tgt_padding_mask"]] > 0)
    logits = model(**{k: v for k, v in b.items() if k != "labels"})
    assert logits.shape == (3, 5, V)
    eps = cfg.label_smoothing
    # label smoothing over the real vocabulary only (fairseq's eps / (V - 1) per other token)
    expected = F.cross_entropy(logits.reshape(-1, V), b["labels"].reshape(-1), reduction="none",
                               label_smoothing=eps * V / (V - 1)).view(3, 5)
    torch.testing.assert_close(loss[~b["tgt_padding_mask"]], expected[~b["tgt_padding_mask"]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(presets.SYSTEMS))
def test_extra_padding_and_future_tokens_do_not_change_the_loss(megatron_world1, name):
    """Causality in every system: padding and the target's future never change a real position's loss (decoder
    sentence routing reads the source, capacity dropping is off outside training)."""
    cfg = system(name)
    model = build(cfg).eval()
    b = batch()
    loss = model(**b)
    # Two more padding columns on the source and the target change nothing for real positions.
    padded = dict(b)
    padded["src_tokens"] = F.pad(b["src_tokens"], (0, 2), value=0)
    padded["src_padding_mask"] = F.pad(b["src_padding_mask"], (0, 2), value=True)
    for key, value in (("tgt_input", 0), ("labels", 0), ("tgt_padding_mask", True)):
        padded[key] = F.pad(b[key], (0, 2), value=value)
    padded["loss_mask"] = F.pad(b["loss_mask"], (0, 2), value=0.0)
    torch.testing.assert_close(model(**padded)[:, :5], loss, atol=1e-5, rtol=1e-5)
    # Changing a source padding token's id is invisible; changing the last target input only affects position 4.
    changed = dict(b, src_tokens=b["src_tokens"].clone(), tgt_input=b["tgt_input"].clone())
    changed["src_tokens"][1, 6] = 17
    changed["tgt_input"][:, 4] = 11
    out = model(**changed)
    torch.testing.assert_close(out[:, :4], loss[:, :4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0, 4], loss[0, 4])


def test_incremental_decoding_matches_the_full_forward(megatron_world1):
    from megatron_taskmoe.model.decoding import ModelDecoder

    model = build(tiny_moe()).eval()
    b = batch()
    keys = ("task_ids", "src_lang_ids", "tgt_lang_ids")
    g = torch.Generator().manual_seed(1)
    # Two target sequences per source, teacher-forced through the full forward (causal, so no padding needed).
    tgt = [torch.randint(4, V, (3, 6), generator=g) for _ in range(2)]
    no_pad = torch.zeros(3, 6, dtype=torch.bool)
    with torch.no_grad():
        full = [torch.log_softmax(model(b["src_tokens"], b["src_padding_mask"], t, no_pad,
                                        **{k: b[k] for k in keys}), dim=-1) for t in tgt]
    # Incrementally: rows 2b, 2b+1 decode source b; row 2b follows sequence 0 and row 2b+1 sequence 1 for three
    # steps, then the beams swap (a reorder) and each row continues the other row's sequence.
    state = model.encode(b["src_tokens"], b["src_padding_mask"], **{k: b[k] for k in keys})
    decoder = ModelDecoder(model, state, beam_size=2, max_length=6)
    follows = [0, 1]
    for t in range(6):
        if t == 3:
            decoder.reorder(torch.tensor([1, 0, 3, 2, 5, 4]))
            follows = [1, 0]
        tokens = torch.stack([tgt[follows[k]][:, t] for k in range(2)], dim=1).reshape(-1)
        step = decoder.step(tokens).view(3, 2, V)
        for k in range(2):
            torch.testing.assert_close(step[:, k], full[follows[k]][:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("system", list(presets.SYSTEMS))
def test_every_system_runs_forward_and_backward(megatron_world1, system):
    cfg = presets.get(system, "tiny", num_tasks=3, num_languages=4)
    model = build(cfg).train()
    b = batch()
    loss = model(**b)
    ((loss * b["loss_mask"]).sum() / b["loss_mask"].sum()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.shared_embedding_or_output_weight().grad.abs().sum() > 0
    if cfg.moe is not None:
        routers = [m for n, m in model.named_modules() if n.endswith("mlp.router")]
        assert len(routers) == cfg.num_moe_layers()
        if cfg.moe.num_experts > 1:
            assert all(r.weight.grad.abs().sum() > 0 for r in routers)
        else:  # "dense + task" systems: one expert, probability 1, the gate cannot learn anything
            assert all(r.weight.grad.abs().sum() == 0 for r in routers)


def test_aux_losses_are_tracked_per_global_layer_number(megatron_world1):
    cfg = tiny_moe()
    model = build(cfg).train()
    # megatron keeps each tracked tensor at the size of its first use (clearing only zeroes it): start afresh
    aux_losses.reset_aux_losses()
    b = batch()
    model(**b).sum().backward()
    entries = aux_losses.aux_loss_entries()
    enc = entries["encoder_load_balancing_loss"].values
    dec = entries["decoder_load_balancing_loss"].values
    assert enc.shape == (4,) and dec.shape == (4,)
    assert torch.all(enc[:2] > 0) and torch.all(enc[2:] == 0), "encoder layers are 1..2"
    assert torch.all(dec[2:] > 0) and torch.all(dec[:2] == 0), "decoder layers are 3..4"
    numbers = [layer.layer_number for layer in list(model.encoder.layers) + list(model.decoder.layers)]
    assert numbers == [1, 2, 3, 4]
    aux_losses.clear_aux_losses()


def test_stage_flags_build_partial_models(megatron_world1):
    cfg = presets.tiny()
    groups.model_parallel_manual_seed(0)
    encoder_stage = EncoderDecoderModel(cfg, post_process=False, add_decoder=False)
    assert encoder_stage.decoder is None and not hasattr(encoder_stage, "output_layer")
    b = batch()
    hidden = encoder_stage(**b)
    assert hidden.shape == (7, 3, cfg.hidden_size)
    decoder_stage = EncoderDecoderModel(cfg, add_encoder=False, decoder_layers=[1], pre_process=False)
    assert decoder_stage.encoder is None and len(decoder_stage.decoder.layers) == 1
    assert decoder_stage.decoder.layers[0].layer_number == cfg.encoder_layers + 2
    decoder_stage.set_input_tensor([torch.randn(5, 3, cfg.hidden_size), hidden.detach()])
    assert decoder_stage(**b).shape == (3, 5)
    with pytest.raises(ValueError, match="contiguous range"):
        EncoderDecoderModel(cfg, decoder_layers=[0, 2])
    with pytest.raises(RuntimeError, match="needs the whole model"):
        encoder_stage.encode(b["src_tokens"], b["src_padding_mask"])
    with pytest.raises(ValueError, match="exceeds the 64 learned positions"):
        build(cfg)(**batch(S=70))


@pytest.mark.parametrize("adapters", ["static", "dynamic", "shared_dynamic"])
def test_adding_adapters_to_a_trained_model_leaves_its_outputs_unchanged(megatron_world1, adapters):
    with_adapters = system({"static": "moe_task_static", "dynamic": "moe_task_dynamic",
                            "shared_dynamic": "moe_task_shared_dynamic"}[adapters])
    without = replace(with_adapters, moe=replace(with_adapters.moe, adapters=replace(with_adapters.moe.adapters,
                                                                                     mode="none")))
    trained = build(without, seed=1).eval()
    with torch.no_grad():  # weights no initialisation would give
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    extended = build(with_adapters, seed=2).eval()
    missing, unexpected = extended.load_state_dict(trained.state_dict(), strict=False)
    assert not unexpected and missing and all(".adapters." in k for k in missing)
    b = batch()
    keys = [k for k in b if k != "labels"]
    torch.testing.assert_close(extended(**{k: b[k] for k in keys}), trained(**{k: b[k] for k in keys}), atol=0, rtol=0)


def test_capacity_drops_in_training_only_so_a_sentence_translates_alone_as_in_its_batch(megatron_world1):
    from megatron_taskmoe.generation import beam_search
    from megatron_taskmoe.model.decoding import ModelDecoder

    cfg = system("moe_token", capacity_factor=0.5)
    model = build(cfg)
    b = batch(B=3, S=7, T=5)
    keys = [k for k in b if k != "labels"]
    one = {k: v[1:2] for k, v in b.items()}
    model.train()
    with torch.no_grad():
        dropped_in_batch = model(**{k: b[k] for k in keys})[1]
        dropped_alone = model(**{k: one[k] for k in keys})[0]
    assert not torch.allclose(dropped_in_batch, dropped_alone, atol=1e-4)  # the capacity is live in training
    model.eval()
    torch.testing.assert_close(model(**{k: one[k] for k in keys})[0], model(**{k: b[k] for k in keys})[1],
                               atol=1e-5, rtol=1e-5)
    ids = ("task_ids", "src_lang_ids", "tgt_lang_ids")

    def translate(rows):
        state = model.encode(b["src_tokens"][rows], b["src_padding_mask"][rows], **{k: b[k][rows] for k in ids})
        return beam_search(ModelDecoder(model, state, beam_size=3, max_length=7), batch_size=len(rows), bos=2,
                           eos=3, max_lengths=[6] * len(rows), beam_size=3)

    assert translate([1]) == translate([0, 1, 2])[1:2]


def test_decoder_sentence_routing_follows_the_source_sentence(megatron_world1):
    cfg = system("moe_sentence")
    model = build(cfg).eval()
    maps = []
    routers = [m for n, m in model.named_modules() if n.startswith("decoder") and n.endswith("mlp.router")]
    hooks = [r.register_forward_hook(lambda m, i, out: maps.append(out[1].reshape(-1, len(i[0][0]), out[1].shape[-1])))
             for r in routers]
    b = batch()
    keys = [k for k in b if k != "labels"]
    model(**{k: b[k] for k in keys})
    other_target = dict(b, tgt_input=torch.randint(4, V, b["tgt_input"].shape, generator=torch.Generator().manual_seed(9)))
    model(**{k: other_target[k] for k in keys})
    for h in hooks:
        h.remove()
    first, second = maps[: len(routers)], maps[len(routers):]
    for map_TBE, again_TBE in zip(first, second):
        assert (map_TBE == map_TBE[:1]).all(), "every target token of a sentence goes to the same experts"
        assert torch.equal(map_TBE, again_TBE), "the decoder's routing depends on the source only"
