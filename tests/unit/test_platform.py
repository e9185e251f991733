"""The CPU platform layer: version gate, idempotence, the CPU stand-ins, RNG tracking and process-group helpers."""

import pytest
import torch

from megatron_taskmoe import platform


def test_apply_is_idempotent_and_lists_its_patches():
    first = platform.apply()
    count = len(platform.PATCHES)
    assert platform.apply() == first
    assert len(platform.PATCHES) == count
    if not torch.cuda.is_available():
        assert first is True
        text = platform.describe_patches()
        for module in platform.PROXIED_MODULES:
            assert module in text
        assert "MoEAlltoAllTokenDispatcher" in text


def test_version_gate_refuses_unverified_versions(monkeypatch):
    monkeypatch.setattr(platform, "mcore_version", lambda: "0.15.0")
    monkeypatch.delenv(platform.ALLOW_UNVERIFIED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"verified against megatron-core==0\.16\.1, found 0\.15\.0"):
        platform.check_mcore_version()
    monkeypatch.setenv(platform.ALLOW_UNVERIFIED_ENV, "1")
    platform.check_mcore_version()


def test_installed_version_is_the_verified_one():
    assert platform.mcore_version() == platform.VERIFIED_MCORE_VERSION


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-ins are only installed without CUDA")
def test_cpu_stand_ins_map_cuda_to_cpu():
    platform.apply()
    from megatron.core.transformer import utils as tutils
    from megatron.core.utils import GlobalMemoryBuffer

    proxy = platform._CpuTorch()
    assert proxy.zeros(3, device="cuda").device.type == "cpu"
    assert proxy.empty(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert proxy.cuda.current_device() == torch.device("cpu")
    proxy.cuda.synchronize()
    assert proxy.nn is torch.nn and proxy.Tensor is torch.Tensor
    # megatron's own CUDA-bound helpers now run on the CPU
    mask = tutils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and torch.equal(mask, torch.ones(4, 4).triu(1).bool())
    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "x")
    assert buf.shape == (2, 3) and buf.device.type == "cpu"
    # the TE name megatron tests for None exists
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None or callable(moe_utils.te_general_gemm)


def test_rng_tracker_forks_reproducibly_and_restores_the_default_stream():
    from megatron.core import tensor_parallel

    platform.init_distributed(rank=0, world_size=1)
    try:
        platform.initialize_model_parallel()
        platform.model_parallel_manual_seed(7)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
        with tracker.fork():
            b = torch.rand(4)
        assert not torch.equal(a, b), "the forked stream advances"
        platform.model_parallel_manual_seed(7)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            assert torch.equal(torch.rand(4), a), "same seed, same stream"
        default = torch.rand(4)
        torch.manual_seed(7)
        assert torch.equal(torch.rand(4), default), "the default stream is seeded with the plain seed"
    finally:
        platform.destroy()
    assert not torch.distributed.is_initialized()


def test_initialize_model_parallel_returns_process_groups_and_validates_sizes():
    platform.init_distributed(rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="world size 1 is not divisible by tensor x pipeline = 2 x 1"):
            platform.initialize_model_parallel(tensor=2)
        pgs = platform.initialize_model_parallel()
        assert pgs.tp.size() == 1 and pgs.ep.size() == 1 and pgs.dp.size() == 1
    finally:
        platform.destroy()


def test_parallel_sizes_messages():
    with pytest.raises(ValueError, match="expert x expert-tensor = 4 x 1 must divide data x tensor = 2 x 1"):
        platform.ParallelSizes(expert=4, expert_tensor=1).validate(2)
    with pytest.raises(ValueError, match="pipeline=0 must be >= 1"):
        platform.ParallelSizes(pipeline=0).validate(2)
    platform.ParallelSizes(tensor=2, expert=2).validate(4)


def test_init_distributed_checks_rank_and_port(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        platform.init_distributed(rank=2, world_size=2, master_port=1)
    with pytest.raises(ValueError, match="needs master_port"):
        platform.init_distributed(rank=0, world_size=2)
    assert not torch.distributed.is_initialized()
