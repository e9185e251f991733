"""Incremental decoding (key/value caches, last-position logits, beam reordering) against the full recompute, on
every system preset: next-token log-probabilities close at every step of a search with beam reorders and finished
sentences leaving, and greedy / beam outputs token for token equal to the former loop search over the
full-recompute model; the reference model's incremental decoding against its own full recompute and against the
megatron model."""

from dataclasses import replace

import pytest
import torch

from megatron_taskmoe.generation import PrefixDecoder, beam_search
from megatron_taskmoe.model import presets
from megatron_taskmoe.model.decoding import ModelDecoder
from megatron_taskmoe.model.encdec import EncoderDecoderModel
from megatron_taskmoe.parallel import groups
from tests.helpers.search_reference import loop_beam_search, masked

BOS, EOS = 2, 3
BANNED = [0, 1, BOS, 250, 251]  # pad, unk, bos and two ids standing for <2xx> tags
KEYS = ("task_ids", "src_lang_ids", "tgt_lang_ids")


def tiny(system: str):
    cfg = presets.get(system, "tiny", num_tasks=3, num_languages=4)
    if cfg.moe is not None:  # every FFN an MoE layer: every decoder layer routes
        cfg = replace(cfg, moe=replace(cfg.moe, encoder=replace(cfg.moe.encoder, layer_freq=1),
                                       decoder=replace(cfg.moe.decoder, layer_freq=1)))
    return cfg


def build(cfg, seed=0):
    """A random model, perturbed so that the parts initialised to no effect (adapters) matter, whose eos logit is
    large enough that hypotheses end at different steps."""
    groups.model_parallel_manual_seed(seed)
    model = EncoderDecoderModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.embedding.word_embeddings.weight[EOS] *= 20
    return model


def sources(B=5, S=8, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (B, S), generator=g)
    mask = torch.arange(S)[None, :] >= torch.randint(3, S + 1, (B,), generator=g)[:, None]
    src[mask] = 0
    return dict(src_tokens=src, src_padding_mask=mask, task_ids=torch.arange(B) % 3,
                src_lang_ids=torch.arange(B) % 4, tgt_lang_ids=(torch.arange(B) + 1) % 4)


def encode(model, b):
    return model.encode(b["src_tokens"], b["src_padding_mask"], **{k: b[k] for k in KEYS})


class Recorder:
    """Runs the incremental decoder and the full recompute side by side; the search follows the incremental one."""

    def __init__(self, incremental, full):
        self.incremental, self.full, self.diffs, self.rows = incremental, full, [], []

    def step(self, tokens_N):
        got, want = self.incremental.step(tokens_N), self.full.step(tokens_N)
        self.rows.append(tokens_N.shape[0])
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        self.diffs.append(float((got - want)[finite].abs().max()))
        return got

    def reorder(self, parent_N, sentences_L=None):
        self.incremental.reorder(parent_N, sentences_L)
        self.full.reorder(parent_N, sentences_L)


@pytest.mark.parametrize("system", list(presets.SYSTEMS))
def test_incremental_decoding_matches_the_full_recompute(megatron_world1, system):
    model = build(tiny(system))
    b = sources()
    state = encode(model, b)
    B, K = 5, 3
    max_lengths = [1, 5, 9, 12, 12]
    # Log-probabilities at every step of a beam search (reorders, sentences leaving the batch: the first one ends
    # at the second step, the others not before the fourth).
    rec = Recorder(ModelDecoder(model, state, beam_size=K, max_length=13),
                   PrefixDecoder(model.step_fn(state), batch_size=B, beam_size=K))
    beam_search(rec, batch_size=B, bos=BOS, eos=EOS, max_lengths=max_lengths, beam_size=K, banned=BANNED,
                min_length=3)
    assert max(rec.diffs) < 1e-4, rec.diffs
    assert rec.rows[0] == B * K and rec.rows[-1] < B * K, "some sentences must finish early"
    # Outputs: the vectorised search over the incremental model equals the former loop search over whole prefixes.
    lengths = set()
    for beam, min_len in ((1, 0), (K, 0), (K, 4)):
        want = loop_beam_search(
            masked(model.step_fn(state), banned=BANNED, eos=EOS, min_length=min_len, max_lengths=max_lengths),
            batch_size=B, bos=BOS, eos=EOS, max_lengths=max_lengths, beam_size=beam)
        got = beam_search(ModelDecoder(model, state, beam_size=beam, max_length=13), batch_size=B, bos=BOS, eos=EOS,
                          max_lengths=max_lengths, beam_size=beam, banned=BANNED, min_length=min_len)
        assert got == want, (beam, min_len)
        lengths |= {len(h) for h in got}
    assert len(lengths) > 2, lengths


def test_the_cache_refuses_training_mode_overflow_and_bad_ids(megatron_world1):
    model = build(tiny("moe_token"))
    state = encode(model, sources(B=2))
    decoder = ModelDecoder(model, state, beam_size=1, max_length=2)
    decoder.step(torch.full((2,), BOS))
    decoder.step(torch.full((2,), 7))
    with pytest.raises(ValueError, match="exceeds the 2 positions"):
        decoder.step(torch.full((2,), 7))
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        ModelDecoder(model, state, beam_size=1, max_length=2).step(torch.full((2,), BOS))
    model.eval()
    # the steps skip the per-micro-batch id check: it runs once, when decoding starts
    with pytest.raises(ValueError, match=r"task_ids_B has ids in \[0, 7\]"):
        ModelDecoder(model, replace(state, task_ids_B=torch.tensor([7, 0])), beam_size=1, max_length=2)


def reference_of(model, cfg):
    """The pure-PyTorch reference model with the megatron model's weights."""
    from megatron_taskmoe.checkpoint_tools.export import arch_config, reference_state
    from megatron_taskmoe.checkpoint_tools.full import FullCheckpoint
    from megatron_taskmoe.config_io import to_dict
    from megatron_taskmoe.reference.model import ReferenceModel

    state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    ckpt = FullCheckpoint(state=state, meta={"model_config": to_dict(cfg)}, tokenizer=None, source="test")
    reference = ReferenceModel(arch_config(cfg))
    reference.load_state_dict(reference_state(ckpt), strict=True)
    return reference.eval()


@pytest.mark.parametrize("system", ["dense", "moe_token", "moe_task_static", "moe_task_shared_dynamic",
                                    "token_enc_task_dec"])
def test_reference_model_decodes_incrementally_as_the_megatron_model(megatron_world1, system):
    from megatron_taskmoe.reference.model import ReferenceDecoder

    cfg = tiny(system)
    model = build(cfg)
    reference = reference_of(model, cfg)
    b = sources()
    r_enc = reference.encode(b["src_tokens"], b["src_padding_mask"], task_ids=b["task_ids"],
                             tgt_lang_ids=b["tgt_lang_ids"])
    B, K, max_lengths = 5, 3, [1, 5, 9, 12, 12]
    rec = Recorder(ReferenceDecoder(reference, r_enc, K), PrefixDecoder(reference.step_fn(r_enc), batch_size=B,
                                                                      beam_size=K))
    beam_search(rec, batch_size=B, bos=BOS, eos=EOS, max_lengths=max_lengths, beam_size=K, banned=BANNED,
                min_length=3)
    assert rec.rows[-1] < B * K
    assert max(rec.diffs) < 1e-4, rec.diffs
    state = encode(model, b)
    for beam in (1, K):
        kw = dict(batch_size=B, bos=BOS, eos=EOS, max_lengths=max_lengths, beam_size=beam, banned=BANNED)
        ours = beam_search(ModelDecoder(model, state, beam_size=beam, max_length=13), **kw)
        assert beam_search(ReferenceDecoder(reference, r_enc, beam), **kw) == ours


def test_both_attention_backends_decode_alike(megatron_world1):
    """The beam-attention kernels (self- and cross-attention, ops.beam_attention) and their pure-torch paths give
    the same log-probabilities (to rounding) and the same beam search outputs."""
    model = build(tiny("moe_task_shared_dynamic"))
    state = encode(model, sources())
    max_lengths = [1, 5, 9, 12, 12]
    rec = Recorder(*(ModelDecoder(model, state, beam_size=3, max_length=13, attention_backend=backend)
                     for backend in ("extension", "torch")))
    kernel_out = beam_search(rec, batch_size=5, bos=BOS, eos=EOS, max_lengths=max_lengths, beam_size=3,
                             banned=BANNED, min_length=3)
    assert max(rec.diffs) < 1e-4, rec.diffs
    torch_decoder = ModelDecoder(model, state, beam_size=3, max_length=13, attention_backend="torch")
    assert beam_search(torch_decoder, batch_size=5, bos=BOS, eos=EOS, max_lengths=max_lengths, beam_size=3,
                       banned=BANNED, min_length=3) == kernel_out


@pytest.mark.parametrize("head_dim,beam", [(64, 4), (64, 5), (128, 3)])
def test_kernels_vector_path_matches_the_full_recompute(megatron_world1, head_dim, beam):
    """At head dims 64 and 128 the kernels take their vector path (query rows in groups of 4, then one by one):
    incremental decoding through them equals the full recompute, and the beam search's outputs are the loop
    search's over whole prefixes."""
    cfg = replace(tiny("moe_task_shared_dynamic"), hidden_size=2 * head_dim, num_attention_heads=2)
    model = build(cfg)
    state = encode(model, sources())
    B, max_lengths = 5, [1, 5, 9, 12, 12]
    rec = Recorder(ModelDecoder(model, state, beam_size=beam, max_length=13, attention_backend="extension"),
                   PrefixDecoder(model.step_fn(state), batch_size=B, beam_size=beam))
    got = beam_search(rec, batch_size=B, bos=BOS, eos=EOS, max_lengths=max_lengths, beam_size=beam, banned=BANNED,
                      min_length=3)
    assert max(rec.diffs) < 1e-4, rec.diffs
    assert rec.rows[-1] < B * beam, "some sentences must finish early"
    want = loop_beam_search(masked(model.step_fn(state), banned=BANNED, eos=EOS, min_length=3,
                                   max_lengths=max_lengths),
                            batch_size=B, bos=BOS, eos=EOS, max_lengths=max_lengths, beam_size=beam)
    assert got == want


@pytest.mark.parametrize("system", ["kudugunta_target", "kudugunta_pair", "token_enc_task_dec"])
def test_one_direction_batches_take_the_fixed_route_with_the_same_results(megatron_world1, system):
    """A batch of one direction (as the translator forms them): task-routed layers run the direction's experts on
    every token without routing them (`TaskMoEMLP`'s fixed route) in the encoder and at every decoding step, and
    the log-probabilities and beam outputs are bit for bit those of per-token routing."""
    from megatron_taskmoe.model.moe import TaskMoEMLP

    model = build(tiny(system))
    b = sources()
    for key in KEYS:
        b[key] = torch.full_like(b[key], 1)
    layers = [m for m in model.modules() if isinstance(m, TaskMoEMLP) and m.use_fixed_route]
    assert layers
    routed_calls = []
    for layer in layers:
        forward = layer.router.forward
        layer.router.forward = lambda *a, _f=forward, **k: routed_calls.append(1) or _f(*a, **k)

    def search(fixed: bool):
        for layer in layers:
            layer.use_fixed_route = fixed
        state = encode(model, b)
        rec = Recorder(ModelDecoder(model, state, beam_size=3, max_length=13), PrefixDecoder(model.step_fn(state),
                       batch_size=5, beam_size=3))
        out = beam_search(rec, batch_size=5, bos=BOS, eos=EOS, max_lengths=[1, 5, 9, 12, 12], beam_size=3,
                          banned=BANNED, min_length=3)
        return out, rec

    routed_out, routed = search(False)
    calls_routed = len(routed_calls)
    fixed_out, fixed = search(True)
    assert calls_routed > 0 and len(routed_calls) == calls_routed, "the fixed route must not route tokens"
    assert fixed_out == routed_out
    assert fixed.rows == routed.rows and fixed.diffs == routed.diffs
    for layer in layers:
        del layer.router.forward
