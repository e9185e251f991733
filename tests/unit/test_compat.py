"""megatron_taskmoe.compat: the version gate, `apply()` (idempotent, reports what it installed, the only thing that
changes megatron-core), the CPU stand-ins and the RNG tracker over the CPU generator.

tests/conftest.py has called `compat.apply()` already, as every process of the project does at start."""

import re
from pathlib import Path

import pytest
import torch

import megatron_taskmoe
from megatron_taskmoe import compat
from megatron_taskmoe.compat import cpu, versions
from megatron_taskmoe.parallel import groups


def test_apply_is_idempotent_and_reports_what_it_applied():
    first = compat.apply()
    count = len(compat.PATCHES)
    assert compat.is_applied()
    assert compat.apply() == first == tuple(compat.APPLIED)
    assert len(compat.PATCHES) == count
    if not torch.cuda.is_available():
        assert any(fix.cpu_only for fix in first)
        text = compat.describe()
        for module in cpu.PROXIED_MODULES:
            assert module in text
        assert "MoEAlltoAllTokenDispatcher" in text


def test_version_gate_accepts_the_supported_range_only(monkeypatch):
    monkeypatch.delenv(versions.ALLOW_UNVERIFIED_ENV, raising=False)
    for version in ("0.16.1", "0.17.0", "0.18.2", "0.19.2", "0.19.2+9f78e8f", "0.19.7"):
        versions.check_mcore_version(version)
    for version in ("0.15.0", "0.16.0", "0.16.1rc1", "0.20.0", "0.20.0rc1", "1.0.0"):
        with pytest.raises(RuntimeError, match=rf"supports megatron-core >=0\.16\.1,<0\.20 \(tested: 0\.16\.1, "
                                               rf"0\.19\.2\), found {re.escape(version)}\. Install a supported"):
            versions.check_mcore_version(version)
    monkeypatch.setattr(versions, "mcore_version", lambda: "0.15.0")
    with pytest.raises(RuntimeError, match="found 0.15.0"):
        versions.check_mcore_version()
    monkeypatch.setenv(versions.ALLOW_UNVERIFIED_ENV, "1")
    versions.check_mcore_version()
    versions.check_mcore_version("0.20.0")


def test_version_ranges():
    r = versions.VersionRange(first="0.16.1", end="0.17")
    assert "0.16.1" in r and "0.16.9" in r and "0.16.2+abc" in r
    assert "0.16.0" not in r and "0.17.0" not in r and "0.17.0rc0" not in r and "0.16.1rc1" not in r
    assert str(r) == ">=0.16.1,<0.17" and str(versions.VersionRange(first="0.18.0")) == ">=0.18.0"
    assert "9.0.0" in versions.VersionRange(first="0.18.0")
    with pytest.raises(ValueError, match="end '0.16' is not after first '0.16.1'"):
        versions.VersionRange(first="0.16.1", end="0.16")
    with pytest.raises(ValueError, match="not a megatron-core version: 'main'"):
        versions.version_key("main")


def test_installed_version_is_a_tested_one():
    version = versions.mcore_version()
    assert "+" not in version
    assert version in versions.SUPPORTED_MCORE and version in versions.TESTED_MCORE


def test_fixes_are_applied_exactly_for_their_versions():
    compat.apply()
    version, cpu_only_too = versions.mcore_version(), not torch.cuda.is_available()
    for fix in compat.FIXES:
        assert (fix in compat.APPLIED) == (version in fix.versions and (cpu_only_too or not fix.cpu_only)), fix.name
    from megatron.core.transformer.moe import moe_utils

    te_fix = any(patch.name == "te_general_gemm=None" for patch in compat.PATCHES)
    if versions.mcore_at_least("0.17.0"):
        assert not te_fix, "megatron-core 0.17+ binds te_general_gemm itself"
    assert hasattr(moe_utils, "te_general_gemm")
    text = compat.describe()
    assert text.startswith(f"megatron-core {version}; fixes applied:")
    assert all(fix.name in text for fix in compat.APPLIED)


def test_only_process_entry_points_call_apply():
    """`compat.apply()` is called at process start only (the trainer's `run`, the checkpoint tools' runner and
    their spawned workers); no module that builds models, process groups or translators calls it."""
    package = Path(megatron_taskmoe.__file__).parent
    call = re.compile(r"^\s*compat\.apply\(\)", re.MULTILINE)
    callers = sorted(str(path.relative_to(package)) for path in package.rglob("*.py") if call.search(path.read_text()))
    assert "training/run.py" in callers
    library = [c for c in callers if c.split("/")[0] in ("compat", "model", "parallel", "ops", "data", "reference")
               or c in ("inference.py", "generation.py", "training/setup.py", "training/loop.py")]
    assert library == []


def test_process_groups_refuse_to_start_before_apply(monkeypatch):
    monkeypatch.setitem(compat._STATE, "applied", False)
    with pytest.raises(RuntimeError, match=r"init_distributed: megatron_taskmoe.compat.apply\(\) has not run"):
        groups.init_distributed(rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="model_parallel_manual_seed: megatron_taskmoe.compat.apply"):
        groups.model_parallel_manual_seed(0)
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU stand-ins are only installed without CUDA")
def test_cpu_stand_ins_map_cuda_to_cpu():
    from megatron.core.transformer import utils as tutils
    from megatron.core.utils import GlobalMemoryBuffer

    proxy = cpu._CpuTorch()
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
