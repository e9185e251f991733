"""Fixes to megatron-core bugs that bite on GPU as on CPU: `compat.apply()` installs each (the `Fix`es with
`cpu_only=False` in `compat.FIXES`) on the releases it names, CUDA or not.

Each installer's docstring names the megatron-core file and function it works around (line numbers as of 0.16.1 /
0.19.2) and the releases affected, read off each release's source (0.16.1, 0.17.0, 0.17.1, 0.18.0, 0.18.2, 0.19.0,
0.19.2). No upstream issue is referenced: the fixes were written against the source.

megatron-core modules are imported by the installers (`importlib`), so importing this module imports none of them.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from megatron_taskmoe.compat.fix import Patch


def install_te_name_fix() -> list[Patch]:
    """megatron-core 0.16.x, `transformer/moe/moe_utils.py`, `RouterGatingLinearFunction` (the forward of
    `router_gating_linear`, line 1192; the backward, line 1225) tests `te_general_gemm` for None, but the module
    binds that name only when Transformer Engine imports (line 34): `NameError` without TE, on CPU and GPU alike.
    0.17 binds it to None itself. The fix binds it to None where it is unbound."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if hasattr(moe_utils, "te_general_gemm"):
        return []
    moe_utils.te_general_gemm = None
    return [Patch("te_general_gemm=None", "megatron.core.transformer.moe.moe_utils",
                  "router_gating_linear tests the name for None but it is unbound without Transformer Engine")]


def install_torch_adam_step_fix() -> list[Patch]:
    """Every supported release (0.16.1 to 0.19.2), only without Apex/TE (`distrib_optimizer.HAVE_APEX_OR_TE` false:
    torch's Adam), `optimizer/distrib_optimizer.py`:

    * `DistributedOptimizer.load_state_dict` (0.16.1 line 690, 0.19.2 line 887) restores torch Adam's
      per-parameter `step` from the param groups as ONE tensor shared by all parameters, then
      `_set_main_param_and_optimizer_states` (0.16.1 line 911, 0.19.2 line 1193) copies every state key, `step`
      included, from the checkpoint's parameter state, which has no `step`: loading a "fully_reshardable"
      distributed-optimizer checkpoint raises KeyError('step'); once that is mended, the shared tensor breaks exact
      resume (torch Adam increments it in place once per parameter).
    * `DistributedOptimizer.state_dict` (0.16.1 line 628, 0.19.2 line 825) asserts that the parameter states share
      one `step`, which fails for an optimizer that holds no parameters on this rank (megatron aligns param groups
      over all ranks, so a pipeline stage without MoE layers gets an empty expert optimizer; the trainer always
      chains one, see training/setup.py: mark_expert_parameters). It takes the step of its chained siblings instead
      (`ChainedOptimizer.sharded_state_dict` in `optimizer/optimizer.py` tells it), so the param groups saved from
      whichever rank writes the common state carry the real step."""
    module = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    if getattr(module, "HAVE_APEX_OR_TE", True):
        return []
    patches = []
    cls = module.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:  # already restored from the checkpoint's param groups
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = set_states
    patches.append(Patch("DistributedOptimizer._set_main_param_and_optimizer_states", module.__name__,
                         "keep torch Adam's `step` (restored from param groups) when loading fully-reshardable state"))

    original_load = cls.load_state_dict

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        result = original_load(self, state_dict)
        # The restore put ONE `step` tensor into every parameter's state; torch Adam increments it in place per
        # parameter, so shared it would advance once per parameter per step (wrong bias correction).
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return result

    cls.load_state_dict = load_state_dict
    patches.append(Patch("DistributedOptimizer.load_state_dict", module.__name__,
                         "give every parameter its own torch Adam `step` tensor after a restore"))

    # A rank can hold an optimizer without parameters: megatron aligns param groups over all ranks, so a pipeline
    # stage without MoE layers gets an empty expert optimizer (the trainer always chains one, see
    # training/setup.py: mark_expert_parameters). Its state_dict asserts that its (absent) parameter states share
    # one `step`. It takes the step of its chained siblings instead (they step together), so the param groups
    # saved from whichever rank writes the common state carry the real step.
    original_state_dict = cls.state_dict

    @functools.wraps(original_state_dict)
    def state_dict(self):
        if self.optimizer.state or any(len(g["params"]) for g in self.optimizer.param_groups):
            return original_state_dict(self)
        inner = self.optimizer.state_dict()
        out = {"optimizer": {k: v for k, v in inner.items() if k != "state"}}
        for group in out["optimizer"]["param_groups"]:
            del group["params"]
            group["step"] = getattr(self, "_sibling_step", None)
        if self.grad_scaler:
            out["grad_scaler"] = self.grad_scaler.state_dict()
        return out

    cls.state_dict = state_dict
    patches.append(Patch("DistributedOptimizer.state_dict", module.__name__,
                         "an optimizer without parameters on this rank (e.g. the expert optimizer of a stage "
                         "without MoE layers) saves its chained siblings' step instead of failing"))

    chained = importlib.import_module("megatron.core.optimizer.optimizer").ChainedOptimizer
    original_chained_sd = chained.sharded_state_dict

    @functools.wraps(original_chained_sd)
    def chained_sharded_state_dict(self, *args, **kwargs):
        steps = {float(state["step"]) for opt in self.chained_optimizers if isinstance(opt, cls)
                 for state in opt.optimizer.state.values() if "step" in state}
        for opt in self.chained_optimizers:
            if isinstance(opt, cls):
                opt._sibling_step = next(iter(steps)) if len(steps) == 1 else None
        return original_chained_sd(self, *args, **kwargs)

    chained.sharded_state_dict = chained_sharded_state_dict
    patches.append(Patch("ChainedOptimizer.sharded_state_dict", "megatron.core.optimizer.optimizer",
                         "tell each chained distributed optimizer the chain's Adam step (for one without "
                         "parameters here)"))

    return patches


# How megatron-core < 0.19 matched a checkpoint's optimizer param groups to the optimizer's own when loading.
_STRUCTURAL_GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def install_param_group_schedule_fix() -> list[Patch]:
    """megatron-core 0.19.0 and later, `optimizer/distrib_optimizer.py`: `DistributedOptimizer.load_state_dict`
    (0.19.2 line 887) pairs the checkpoint's param groups with the optimizer's by their schedule values too
    (`max_lr`, `min_lr`, `start_wd`, `end_wd`, ...: `param_group_identifier_keys`), so a checkpoint does not load
    into an optimizer built with another learning rate (KeyError) - a resume with a changed `optim.lr`, or the
    checkpoint tools, which rebuild the optimizer from default settings and load the state into it. Before 0.19 the
    groups were paired by structure (`_STRUCTURAL_GROUP_KEYS`) and took the checkpoint's schedule values; this
    restores that: each of the optimizer's groups takes the schedule values of the one checkpoint group with its
    structure, then megatron pairs them as usual (several checkpoint groups of one structure, e.g. per-group LR
    overrides, stay megatron's business)."""
    module = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    schedule_keys = [k for k in module.param_group_identifier_keys if k not in _STRUCTURAL_GROUP_KEYS]
    cls = module.DistributedOptimizer
    original_load = cls.load_state_dict

    def structure(group: dict) -> tuple:
        return tuple(group.get(k) for k in _STRUCTURAL_GROUP_KEYS)

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        saved: dict[tuple, list[dict]] = {}
        for group in state_dict["optimizer"]["param_groups"]:
            saved.setdefault(structure(group), []).append(group)
        for group in self.optimizer.param_groups:
            matches = saved.get(structure(group), [])
            if len(matches) == 1:
                for key in schedule_keys:
                    if key in matches[0]:
                        group[key] = matches[0][key]
                    else:
                        group.pop(key, None)
        return original_load(self, state_dict)

    cls.load_state_dict = load_state_dict
    return [Patch("DistributedOptimizer.load_state_dict", module.__name__,
                  "pair checkpoint param groups by structure and take their LR/WD schedule values (as before 0.19)")]


def install_legacy_common_state_file() -> list[Patch]:
    """megatron-core 0.19.0 and later, `dist_checkpointing/serialization.py` (`save`, line 349;
    `load_common_state_dict`, line 206): a torch_dist checkpoint keeps its common (non-tensor) state - scheduler,
    counters, optimizer param groups - inside its DCP files, where releases before 0.19 look for a `common.pt`
    beside them (`strategies/common.py`, `COMMON_STATE_FNAME`) and fail without it. After every synchronous
    `dist_checkpointing.save`, rank 0 also writes that `common.pt` (the same state, read back from the checkpoint),
    so a checkpoint written here loads on every supported release; 0.19 itself reads `common.pt` first when it is
    there. `dist_checkpointing.save` (the name the project saves through) is wrapped as it is at `compat.apply()`,
    wrappers of its callers included."""
    package = importlib.import_module("megatron.core.dist_checkpointing")
    serialization = importlib.import_module("megatron.core.dist_checkpointing.serialization")
    common = importlib.import_module("megatron.core.dist_checkpointing.strategies.common")
    original_save = package.save  # what `dist_checkpointing.save` is now (a caller may have wrapped it already)

    @functools.wraps(original_save)
    def save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        result = original_save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        if result is None:  # saved (an async save returns its request; this project saves synchronously)
            if torch.distributed.get_rank() == 0:
                state = serialization.load_common_state_dict(str(checkpoint_dir))
                path = os.path.join(str(checkpoint_dir), common.COMMON_STATE_FNAME)
                torch.save(state, path + ".partial")
                os.replace(path + ".partial", path)
            torch.distributed.barrier()
        return result

    package.save = save
    return [Patch("dist_checkpointing.save", package.__name__,
                  "also write common.pt, the common state as megatron-core 0.16-0.18 read it")]

