"""The model on one CUDA GPU in bf16: megatron_taskmoe.compat stays out of the way, forward/backward run, the bf16 loss
tracks the fp32 loss of the same weights, and incremental decoding works. Skipped without CUDA."""

from dataclasses import replace

import pytest
import torch

from megatron_taskmoe import compat
from megatron_taskmoe.model import presets
from megatron_taskmoe.model.encdec import EncoderDecoderModel
from megatron_taskmoe.parallel import groups

pytestmark = pytest.mark.gpu

V = 256


@pytest.fixture(scope="module")
def gpu_world1():
    groups.init_distributed(rank=0, world_size=1)
    groups.initialize_model_parallel()
    yield
    groups.destroy()


def gpu_batch(B=4, S=9, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (B, S), generator=g)
    tgt = torch.randint(4, V, (B, T), generator=g)
    labels = torch.randint(4, V, (B, T), generator=g)
    src_mask = torch.zeros(B, S, dtype=torch.bool)
    src_mask[1, 6:] = True
    tgt_mask = torch.zeros(B, T, dtype=torch.bool)
    tgt_mask[2, 4:] = True
    b = dict(src_tokens=src, src_padding_mask=src_mask, tgt_input=tgt, tgt_padding_mask=tgt_mask, labels=labels,
             loss_mask=(~tgt_mask).float(), task_ids=torch.arange(B) % 3, src_lang_ids=torch.arange(B) % 4,
             tgt_lang_ids=(torch.arange(B) + 1) % 4)
    return {k: v.cuda() for k, v in b.items()}


def build(cfg, seed=0):
    groups.model_parallel_manual_seed(seed)
    return EncoderDecoderModel(cfg).cuda()


def test_compat_changes_nothing_on_a_gpu():
    # on a GPU only megatron-core bug fixes apply (compat/fixes.py), none of the CPU stand-ins
    assert not any(fix.cpu_only for fix in compat.apply()), compat.describe()
    from megatron.core.tensor_parallel import mappings

    assert mappings.torch is torch


@pytest.mark.parametrize("system", ["dense", "moe_token", "moe_task_shared_dynamic", "token_enc_task_dec"])
def test_bf16_forward_backward_tracks_fp32(gpu_world1, system):
    cfg32 = presets.get(system, "tiny", num_tasks=3, num_languages=4)
    cfg16 = replace(cfg32, params_dtype="bf16")
    model16 = build(cfg16).train()
    assert all(p.dtype == torch.bfloat16 for n, p in model16.named_parameters() if "router" not in n)
    b = gpu_batch()
    loss16 = model16(**b)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16).all()
    ((loss16 * b["loss_mask"]).sum() / b["loss_mask"].sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model16.parameters() if p.grad is not None)

    model32 = build(cfg32).eval()
    model16.eval()
    with torch.no_grad():
        for (n32, p32), (n16, p16) in zip(model32.named_parameters(), model16.named_parameters()):
            assert n32 == n16
            p32.copy_(p16.float())
        l16, l32 = model16(**b), model32(**b)
    mask = b["loss_mask"].bool()
    assert (l16[mask] - l32[mask]).abs().mean() < 0.05 * l32[mask].abs().mean()


@pytest.mark.parametrize("beam", [1, 3])
def test_incremental_decoding_on_gpu_equals_the_full_recompute(gpu_world1, beam):
    from megatron_taskmoe.generation import PrefixDecoder, beam_search
    from megatron_taskmoe.model.decoding import ModelDecoder

    model = build(presets.get("moe_token", "tiny", num_tasks=3, num_languages=4)).eval()  # fp32: exact comparison
    b = gpu_batch()
    state = model.encode(b["src_tokens"], b["src_padding_mask"], task_ids=b["task_ids"],
                         src_lang_ids=b["src_lang_ids"], tgt_lang_ids=b["tgt_lang_ids"])
    kw = dict(batch_size=4, bos=2, eos=3, max_lengths=[3, 5, 8, 8], beam_size=beam, banned=[0, 1, 2], device="cuda")
    hyps = beam_search(ModelDecoder(model, state, beam_size=beam, max_length=9), **kw)
    assert hyps == beam_search(PrefixDecoder(model.step_fn(state), batch_size=4, beam_size=beam, device="cuda"), **kw)
    assert len(hyps) == 4 and all(len(h) <= 8 for h in hyps)
    bf16 = build(replace(presets.get("moe_token", "tiny", num_tasks=3, num_languages=4), params_dtype="bf16")).eval()
    state = bf16.encode(b["src_tokens"], b["src_padding_mask"], task_ids=b["task_ids"],
                        src_lang_ids=b["src_lang_ids"], tgt_lang_ids=b["tgt_lang_ids"])
    assert len(beam_search(ModelDecoder(bf16, state, beam_size=beam, max_length=9), **kw)) == 4
