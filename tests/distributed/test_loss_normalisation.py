"""The trainer's loss is per token: a step's gradient is that of (sum of the token losses of all its micro-batches on
all data-parallel ranks) / (their target-token count), whatever the micro-batches' lengths; the MoE auxiliary losses
are weighted by their side's token count the same way.

Two data-parallel ranks run two micro-batches each, of very different lengths, through the trainer's own pieces
(`setup.build`: DDP, `finalize_model_grads`, `calculate_per_token_loss`; `loop.make_forward_step`; megatron's
schedule). The reference is one process summing the same token losses and dividing by the total. Averaging per
micro-batch instead (megatron's default) gives other gradients, which the test would catch: a short micro-batch's
tokens would weigh several times a long one's.
"""

import pytest
import torch

from megatron_taskmoe.model import presets
from megatron_taskmoe.parallel import groups

from tests.helpers import harness as H

pytestmark = pytest.mark.distributed

SEED = 1234
# (sentences, source length, target length) of the four micro-batches: ranks 0 and 1 take two each
SHAPES = [(4, 6, 3), (2, 9, 12), (3, 5, 4), (1, 7, 14)]


def model_config():
    return presets.get("moe_token", "tiny", num_tasks=3, num_languages=4, vocab_size=250)


def micro_batches():
    return [H.make_batch(250, b, s, t, seed=i) for i, (b, s, t) in enumerate(SHAPES)]


def reference_grads() -> dict[str, torch.Tensor]:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_taskmoe.model.config import to_transformer_config
    from megatron_taskmoe.model.encdec import EncoderDecoderModel

    groups.init_distributed(rank=0, world_size=1)
    try:
        groups.initialize_model_parallel()
        cfg = model_config()
        tconfig = to_transformer_config(cfg, calculate_per_token_loss=True)
        model = EncoderDecoderModel(cfg, transformer_config=tconfig, init_seed=SEED)
        batches = micro_batches()
        total = sum(float(b["loss_mask"].sum()) for b in batches)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / total))
        for mb in batches:
            keys = [k for k in mb if k != "loss_mask"]
            ((model(**{k: mb[k] for k in keys}) * mb["loss_mask"]).sum() / total).backward()
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        return {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    finally:
        groups.destroy()


def run_trainer_step(rank: int, world_size: int, ref_path: str) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_taskmoe.training.config import RunConfig
    from megatron_taskmoe.training.forward import make_forward_step
    from megatron_taskmoe.training.setup import build

    cfg = RunConfig()
    cfg.train.seed, cfg.train.micro_batches = SEED, 2
    cfg.optim.distributed_optimizer = False  # full gradients on every rank, to compare
    model_cfg = model_config()
    built = build(cfg, model_cfg)
    assert built.transformer_config.calculate_per_token_loss
    mine = micro_batches()[2 * rank: 2 * rank + 2]
    built.model.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=make_forward_step(), data_iterator=iter(mine),
                                model=[built.model], num_microbatches=2, seq_length=1, micro_batch_size=1,
                                forward_only=False)
    ref = torch.load(ref_path, weights_only=False)
    checked = 0
    for name, param in built.module.named_parameters():
        torch.testing.assert_close(param.main_grad, ref[name], atol=1e-6, rtol=1e-4,
                                   msg=lambda m, n=name: f"rank {rank} grad of {n}: {m}")
        checked += 1
    assert checked == len(ref)


def test_step_gradient_is_the_token_mean_over_all_micro_batches_and_ranks(tmp_path):
    path = str(tmp_path / "reference.pt")
    torch.save(reference_grads(), path)
    H.spawn(run_trainer_step, 2, path, tmp_dir=str(tmp_path))
