"""Our spec modules against references: SDPA core attention vs megatron's DotProductAttention, the
sequence-parallel norm vs torch's norms, the inference paths of the embedding and the parallel linears vs
megatron's forward, and the tensor-parallel-safe label-smoothed cross-entropy vs torch."""

import pytest
import torch
import torch.nn.functional as F

from megatron_taskmoe.model import presets
from megatron_taskmoe.model.config import to_transformer_config
from megatron_taskmoe.model.embedding import ScaledEmbedding
from megatron_taskmoe.model.linear import ColumnParallelLinear, RowParallelLinear


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_attention_equals_megatron_dot_product_attention(megatron_world1, causal):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_taskmoe.model.attention import SDPAttention

    cfg = to_transformer_config(presets.tiny())
    mask_type = AttnMaskType.causal if causal else AttnMaskType.padding
    ours = SDPAttention(cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    theirs = DotProductAttention(cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    g = torch.Generator().manual_seed(0)
    S, B, H, Dh = 5, 3, 4, 8
    q, k, v = (torch.randn(S, B, H, Dh, generator=g) for _ in range(3))
    pad_BS = torch.zeros(B, S, dtype=torch.bool)
    pad_BS[1, 3:] = True
    pad_BS[2, 4:] = True
    mask = pad_BS[:, None, None, :]
    if causal:
        # megatron's unfused path applies the causal mask only when given no mask: give it the combined one
        mask = mask | torch.ones(S, S).triu(1).bool()
    expected = theirs(q, k, v, mask, attn_mask_type=mask_type)
    got = ours(q, k, v, pad_BS[:, None, None, :], attn_mask_type=mask_type)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sdpa_attention_survives_fully_masked_rows(megatron_world1):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_taskmoe.model.attention import SDPAttention

    cfg = to_transformer_config(presets.tiny())
    attn = SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.padding, attention_type="self")
    q = torch.randn(4, 2, 4, 8)
    mask = torch.tensor([[False] * 4, [True] * 4])[:, None, None, :]
    assert torch.isfinite(attn(q, q, q, mask)).all()


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_sequence_parallel_norm_matches_torch_and_marks_params(megatron_world1, kind):
    from megatron_taskmoe.model.norm import SequenceParallelNorm

    cfg = to_transformer_config(presets.tiny(normalization=kind))
    norm = SequenceParallelNorm(cfg, hidden_size=32, eps=1e-5)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    x = torch.randn(3, 2, 32)
    if kind == "LayerNorm":
        expected = F.layer_norm(x, (32,), norm.weight, norm.bias, 1e-5)
    else:
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
    assert all(hasattr(p, "sequence_parallel") for p in norm.parameters())
    assert len(list(norm.parameters())) == (2 if kind == "LayerNorm" else 1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("real_vocab", [16, 13])
def test_label_smoothed_ce_matches_torch(megatron_world1, smoothing, real_vocab):
    """Over the real vocabulary: the rows padding the table (13 real of 16) take no probability or smoothing."""
    from megatron.core import parallel_state as ps

    from megatron_taskmoe.model.encdec import vocab_parallel_label_smoothed_ce

    g = torch.Generator().manual_seed(0)
    T, B, Vp, V = 4, 3, 16, real_vocab
    logits = torch.randn(T, B, Vp, generator=g, requires_grad=True)
    target = torch.randint(0, V, (T, B), generator=g)
    before = logits.detach().clone()
    got = vocab_parallel_label_smoothed_ce(logits, target, smoothing, ps.get_tensor_model_parallel_group(),
                                           vocab_size=V)
    assert torch.equal(logits.detach(), before)
    # fairseq/megatron convention: eps' = eps * V / (V - 1) in torch's parametrization
    expected = F.cross_entropy(logits[..., :V].reshape(-1, V), target.reshape(-1), reduction="none",
                               label_smoothing=smoothing * V / (V - 1)).view(T, B)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    grad_ours = logits.grad.clone()
    logits.grad = None
    expected.sum().backward()
    torch.testing.assert_close(grad_ours, logits.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 128 ** 0.5])
def test_embedding_inference_path_equals_megatron_forward(megatron_world1, scale):
    """Without gradients in eval mode the embedding skips megatron's forward; the numbers are its, bit for bit."""
    cfg = to_transformer_config(presets.tiny())
    emb = ScaledEmbedding(config=cfg, vocab_size=64, max_sequence_length=16,
                          position_embedding_type="learned_absolute", scale=scale).eval()
    g = torch.Generator().manual_seed(0)
    tokens_BX = torch.randint(0, 64, (3, 5), generator=g)
    positions_BX = torch.randint(0, 16, (3, 5), generator=g)
    with torch.enable_grad():  # megatron's forward
        expected_XBD = emb(tokens_BX, positions_BX).detach()
    assert not emb._plain_inference(None)
    with torch.no_grad():
        assert emb._plain_inference(None)
        got_XBD = emb(tokens_BX, positions_BX)
    assert got_XBD.shape == (5, 3, cfg.hidden_size) and got_XBD.is_contiguous()
    assert torch.equal(got_XBD, expected_XBD)
    emb.train()  # dropout on: megatron's forward
    with torch.no_grad():
        assert not emb._plain_inference(None)


@pytest.mark.parametrize("bias,skip_bias_add", [(False, False), (True, False), (True, True)])
def test_parallel_linears_inference_path_equals_megatron_forward(megatron_world1, bias, skip_bias_add):
    """Without gradients the linears skip megatron's autograd wrappers; the numbers are its, bit for bit."""
    cfg = to_transformer_config(presets.tiny())
    init = torch.nn.init.normal_
    column = ColumnParallelLinear(32, 48, config=cfg, init_method=init, bias=bias, skip_bias_add=skip_bias_add)
    row = RowParallelLinear(48, 32, config=cfg, init_method=init, bias=bias, input_is_parallel=True,
                            skip_bias_add=skip_bias_add)
    for layer in (column, row):
        if bias:
            torch.nn.init.normal_(layer.bias)
    x_QND = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():  # megatron's forward
        h_expected, hb_expected = column(x_QND)
        y_expected, yb_expected = row(h_expected)
    with torch.no_grad():
        h, hb = column(x_QND)
        y, yb = row(h)
    assert torch.equal(h, h_expected.detach()) and torch.equal(y, y_expected.detach())
    for got, expected in ((hb, hb_expected), (yb, yb_expected)):
        assert (got is None) == (expected is None) and (got is None or torch.equal(got, expected))
