"""megatron_taskmoe.compat with a one-rank process group: building a model changes nothing in megatron-core, the
CPU RNG tracker, the aux-loss reduction over one rank.

tests/conftest.py has called `compat.apply()` already, as every process of the project does at start."""

import dataclasses
import importlib

import pytest
import torch

from megatron_taskmoe import compat
from megatron_taskmoe.compat import aux_losses, cpu
from megatron_taskmoe.model import presets
from megatron_taskmoe.model.encdec import EncoderDecoderModel
from megatron_taskmoe.parallel import groups


@pytest.fixture()
def empty_tracker():
    aux_losses.reset_aux_losses()
    yield
    aux_losses.reset_aux_losses()


def _megatron_attributes() -> dict:
    """Every megatron-core attribute a patch of `compat.PATCHES` replaced, as it is now (name, where -> object)."""
    from megatron.core.dist_checkpointing import save
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random

    seen = {f"{module}.torch": importlib.import_module(module).torch for module in cpu.PROXIED_MODULES}
    seen.update(tracker=random.CudaRNGStatesTracker, save=save, load=DistributedOptimizer.load_state_dict)
    return seen


def test_building_a_model_applies_nothing(monkeypatch):
    """Model construction does not call `compat.apply()` (with `apply()` marked as not run and every fix made to
    fail, a model still builds) and leaves megatron-core's patched attributes as they were."""
    groups.init_distributed(rank=0, world_size=1)
    try:
        groups.initialize_model_parallel()
        groups.model_parallel_manual_seed(0)
        before, applied, patches = _megatron_attributes(), list(compat.APPLIED), list(compat.PATCHES)

        def refuse():
            raise AssertionError("building a model installed a compat fix")

        monkeypatch.setitem(compat._STATE, "applied", False)
        monkeypatch.setattr(compat, "FIXES", tuple(dataclasses.replace(f, install=refuse) for f in compat.FIXES))
        model = EncoderDecoderModel(presets.get("moe_token", "tiny", num_tasks=3, num_languages=4))
        assert sum(p.numel() for p in model.parameters()) > 0
        assert _megatron_attributes() == before
        assert compat.APPLIED == applied and compat.PATCHES == patches
    finally:
        groups.destroy()


def test_rng_tracker_forks_reproducibly_and_restores_the_default_stream():
    from megatron.core import tensor_parallel

    groups.init_distributed(rank=0, world_size=1)
    try:
        groups.initialize_model_parallel()
        groups.model_parallel_manual_seed(7)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
        with tracker.fork():
            b = torch.rand(4)
        assert not torch.equal(a, b), "the forked stream advances"
        groups.model_parallel_manual_seed(7)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            assert torch.equal(torch.rand(4), a), "same seed, same stream"
        default = torch.rand(4)
        torch.manual_seed(7)
        assert torch.equal(torch.rand(4), default), "the default stream is seeded with the plain seed"
    finally:
        groups.destroy()
    assert not torch.distributed.is_initialized()


def test_aux_loss_reduction_over_one_rank_keeps_the_values(empty_tracker):
    groups.init_distributed(rank=0, world_size=1)
    try:
        pgs = groups.initialize_model_parallel()
        aux_losses.record_aux_loss("encoder_load_balancing_loss", torch.tensor(0.5), 1, 2, reduce_group=pgs.tp)
        aux_losses.record_aux_loss("decoder_z_loss", torch.tensor(0.25), 2, 2)
        aux_losses.reduce_aux_losses(pgs)
        entries = aux_losses.aux_loss_entries()
        assert entries["encoder_load_balancing_loss"].values.tolist() == [0.5, 0.0]
        assert entries["decoder_z_loss"].values.tolist() == [0.0, 0.25]
    finally:
        groups.destroy()
