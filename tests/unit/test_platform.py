"""The CPU platform layer: version gate, idempotence, the CPU stand-ins, RNG tracking and process-group helpers."""

import re

import pytest
import torch

from megatron_taskmoe import mcore_compat, platform


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


def test_version_gate_accepts_the_supported_range_only(monkeypatch):
    monkeypatch.delenv(platform.ALLOW_UNVERIFIED_ENV, raising=False)
    for version in ("0.16.1", "0.17.0", "0.18.2", "0.19.2", "0.19.2+9f78e8f", "0.19.7"):
        platform.check_mcore_version(version)
    for version in ("0.15.0", "0.16.0", "0.16.1rc1", "0.20.0", "0.20.0rc1", "1.0.0"):
        with pytest.raises(RuntimeError, match=rf"supports megatron-core >=0\.16\.1,<0\.20 \(tested: 0\.16\.1, "
                                               rf"0\.19\.2\), found {re.escape(version)}\. Install a supported"):
            platform.check_mcore_version(version)
    monkeypatch.setattr(mcore_compat, "mcore_version", lambda: "0.15.0")
    with pytest.raises(RuntimeError, match="found 0.15.0"):
        platform.check_mcore_version()
    monkeypatch.setenv(platform.ALLOW_UNVERIFIED_ENV, "1")
    platform.check_mcore_version()
    platform.check_mcore_version("0.20.0")


def test_version_ranges():
    r = mcore_compat.VersionRange(first="0.16.1", end="0.17")
    assert "0.16.1" in r and "0.16.9" in r and "0.16.2+abc" in r
    assert "0.16.0" not in r and "0.17.0" not in r and "0.17.0rc0" not in r and "0.16.1rc1" not in r
    assert str(r) == ">=0.16.1,<0.17" and str(mcore_compat.VersionRange(first="0.18.0")) == ">=0.18.0"
    assert "9.0.0" in mcore_compat.VersionRange(first="0.18.0")
    with pytest.raises(ValueError, match="end '0.16' is not after first '0.16.1'"):
        mcore_compat.VersionRange(first="0.16.1", end="0.16")
    with pytest.raises(ValueError, match="not a megatron-core version: 'main'"):
        mcore_compat.version_key("main")


def test_installed_version_is_a_tested_one():
    version = platform.mcore_version()
    assert "+" not in version
    assert version in platform.SUPPORTED_MCORE and version in platform.TESTED_MCORE


def test_fixes_are_applied_exactly_for_their_versions():
    platform.apply()
    version, cpu = platform.mcore_version(), not torch.cuda.is_available()
    for fix in platform.FIXES:
        assert (fix in platform.APPLIED) == (version in fix.versions and (cpu or not fix.cpu_only)), fix.name
    from megatron.core.transformer.moe import moe_utils

    te_fix = any(name == "te_general_gemm=None" for name, _, _ in platform.PATCHES)
    if mcore_compat.mcore_at_least("0.17.0"):
        assert not te_fix, "megatron-core 0.17+ binds te_general_gemm itself"
    assert hasattr(moe_utils, "te_general_gemm")
    text = platform.describe_patches()
    assert text.startswith(f"megatron-core {version}; fixes applied:")
    assert all(fix.name in text for fix in platform.APPLIED)


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
