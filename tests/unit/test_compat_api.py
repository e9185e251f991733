"""compat's API shims: the same behaviour on every supported megatron-core release (aux-loss tracker, permute,
dispatcher choices), checked on the release installed (`make test`: 0.16.1, `make test-py312`: 0.19.2).

Legend: T tokens, H hidden size, E experts, N permuted rows.
"""

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_taskmoe.compat import aux_losses, moe, versions
from megatron_taskmoe.model import presets, specs
from megatron_taskmoe.model.moe import TaskMoEMLP
from megatron_taskmoe.ops import permute
from tests.helpers.permute_reference import topk_routing


@pytest.fixture()
def empty_tracker():
    aux_losses.reset_aux_losses()
    yield
    aux_losses.reset_aux_losses()


def test_aux_loss_tracker_records_reorders_clears_and_resets(empty_tracker):
    group = object()  # stands in for a process group: the tracker only stores it until a reduction
    aux_losses.record_aux_loss("decoder_z_loss", torch.tensor(0.5), 2, 3)
    aux_losses.record_aux_loss("decoder_z_loss", torch.tensor(0.25), 2, 3)
    aux_losses.record_aux_loss("encoder_load_balancing_loss", torch.tensor(1.5), 1, 3, reduce_group=group)
    aux_losses.record_aux_loss("encoder_load_balancing_loss", torch.tensor(9.0), None, 3)  # no layer: ignored
    entries = aux_losses.aux_loss_entries()
    assert list(entries) == ["decoder_z_loss", "encoder_load_balancing_loss"]
    assert entries["decoder_z_loss"].values.tolist() == [0.0, 0.75, 0.0]
    assert entries["decoder_z_loss"].reduce_group is None and not entries["decoder_z_loss"].needs_dp_avg
    enc = entries["encoder_load_balancing_loss"]
    assert enc.values.tolist() == [1.5, 0.0, 0.0] and enc.reduce_group is group and enc.needs_dp_avg

    extra = aux_losses.AuxLossEntry(values=torch.zeros(3), reduce_group=group, needs_dp_avg=True)
    aux_losses.set_aux_loss_entries({"a_loss": extra, **entries})
    again = aux_losses.aux_loss_entries()
    assert list(again) == ["a_loss", "decoder_z_loss", "encoder_load_balancing_loss"]
    assert again["encoder_load_balancing_loss"].values is enc.values, "entries keep the tracker's own tensors"
    assert again["a_loss"].needs_dp_avg and again["a_loss"].reduce_group is group
    aux_losses.record_aux_loss("a_loss", torch.tensor(2.0), 3, 3, reduce_group=group)
    assert aux_losses.aux_loss_entries()["a_loss"].values.tolist() == [0.0, 0.0, 2.0]

    aux_losses.clear_aux_losses()
    assert all(e.values.sum() == 0 for e in aux_losses.aux_loss_entries().values())
    assert len(aux_losses.aux_loss_entries()) == 3, "clearing keeps the entries"
    aux_losses.reset_aux_losses()
    assert aux_losses.aux_loss_entries() == {}


@pytest.mark.parametrize("with_probs", [False, True])
def test_mcore_permute_gives_megatrons_three_results_on_every_release(with_probs):
    routing_map_TE, probs_TE = topk_routing(13, 4, 2, seed=3)
    tokens_TH = torch.randn(13, 8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(probs=probs_TE) if with_probs else {}
    result = moe.mcore_permute(tokens_TH, routing_map_TE, num_out_tokens=26, **kwargs)
    assert len(result) == 3
    ours_NH, ours_probs_N, ours_idx_N = permute(tokens_TH, routing_map_TE, num_out_tokens=26, backend="torch",
                                                **kwargs)
    assert torch.equal(result[0], ours_NH) and torch.equal(result[2], ours_idx_N)
    assert (result[1] is None) == (not with_probs)
    if with_probs:
        assert torch.equal(result[1], ours_probs_N)


def test_release_dependent_choices_follow_the_installed_version():
    version = versions.mcore_version()
    assert moe.shared_experts_run_in_token_comm() == (versions.version_key(version) >= (0, 18, 0, 1))
    if not torch.cuda.is_available():
        assert not moe.megatron_permute_fusion_available()
        assert not moe.use_megatron_permute_fusion("auto")
    assert not moe.use_megatron_permute_fusion("extension")
    assert not moe.use_megatron_permute_fusion("torch")


def test_auto_permutation_takes_megatrons_fused_dispatcher_when_it_is_available(monkeypatch):
    cfg = presets.get("moe_token", "tiny", num_tasks=3, num_languages=4)
    monkeypatch.setattr(specs, "use_megatron_permute_fusion", lambda backend: False)
    ours = specs.moe_mlp_spec(cfg, "encoder", task_context=None)
    assert ours.module is TaskMoEMLP and ours.params["token_dispatcher_builder"] is not None
    monkeypatch.setattr(specs, "use_megatron_permute_fusion", lambda backend: backend == "auto")
    fused = specs.moe_mlp_spec(cfg, "encoder", task_context=None)
    assert fused.module is MoELayer, "megatron's MoELayer keeps megatron's dispatcher (with moe_permute_fusion)"
