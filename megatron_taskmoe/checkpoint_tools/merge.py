"""Merge two task-MoE checkpoints trained on disjoint task sets (Pham et al. 2023, section 5.2.2).

"We restore two respective checkpoints and merge layer-by-layer as follows. First, task-based adapters are kept and
combined with each other [...]. Second, the task routers will also be merged and changed so that the routing of
each data will now have 4 selections instead of 2 outputs as in the previous models. Finally, the rest of the
transformer and MoE layers will have their weights averaged."

Here, per tensor of the one-process model (`full.FullCheckpoint` names):
  * dynamic / shared-dynamic adapters (stacked `[A, ...]` parameters and the adapter gate's rows): concatenated,
    A's adapters then B's (La + Lb adapters), so the adapter gate chooses among all of them;
  * static adapters (one per task row) and every task table (router `task_embedding`, a dynamic gate's own table):
    re-indexed by NAME into the union id space (a task, or a target language when `task_source` is the target
    language); a row both models have (a language they share, e.g. "en") is averaged;
  * every other tensor (embeddings, attention, norms, dense FFNs, experts, router gate weights): averaged,
    `weight * A + (1 - weight) * B`.
The result's task map covers both task sets: A's tasks then B's, or exactly the task map of a data directory's
manifest (the union corpus the merged model continues training on, so `pretrain_mt.py` accepts it).

Legend: G task-table rows, C task embedding dim, A adapters, D model dim, H adapter width.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Optional

import torch

from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError, FullCheckpoint
from megatron_taskmoe.config_io import to_dict
from megatron_taskmoe.model.config import ModelConfig

ADAPTER_STACKED = ("ln_weight_AD", "ln_bias_AD", "down_ADH", "down_bias_AH", "up_AHD", "up_bias_AD", "gate_weight")


def _comparable(cfg: ModelConfig) -> dict:
    """The config without what a merge changes (id-space sizes, number of dynamic adapters)."""
    d = to_dict(cfg)
    if d.get("moe"):
        for key in ("num_tasks", "num_languages"):
            d["moe"].pop(key)
        d["moe"]["adapters"].pop("num_adapters")
    return d


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} vs {b!r}"]


def check_mergeable(a: FullCheckpoint, b: FullCheckpoint) -> tuple[ModelConfig, ModelConfig]:
    cfg_a, cfg_b = a.model_config(), b.model_config()
    diffs = _diff(_comparable(cfg_a), _comparable(cfg_b))
    if diffs:
        raise CheckpointToolError(f"{a.source} and {b.source} have incompatible model configs (only the task counts "
                                  f"may differ): {'; '.join(diffs[:5])}")
    if cfg_a.moe is None:
        raise CheckpointToolError(f"{a.source}: a dense model has no task routers or adapters to merge")
    sha_a, sha_b = a.meta.get("tokenizer_sha256"), b.meta.get("tokenizer_sha256")
    if sha_a != sha_b:
        raise CheckpointToolError(f"{a.source} and {b.source} were trained with different tokenizers "
                                  f"({str(sha_a)[:12]}... vs {str(sha_b)[:12]}...): their embeddings cannot be averaged")
    overlap = sorted(set(a.meta["task_map"]["tasks"]) & set(b.meta["task_map"]["tasks"]))
    if overlap:
        raise CheckpointToolError(f"task(s) {', '.join(overlap)} are in both {a.source} and {b.source}: the merge "
                                  "combines models trained on disjoint task sets")
    return cfg_a, cfg_b


def union_task_map(a: dict, b: dict, target: Optional[dict] = None) -> dict:
    """The merged task map: `target` (a manifest's) checked against both, else A's tasks then B's."""
    names = a["tasks"] + b["tasks"]
    directions = {**a["direction_to_task"]}
    offset = len(a["tasks"])
    directions.update({d: t + offset for d, t in b["direction_to_task"].items()})
    if target is None:
        return {"mode": f"merged:{a.get('mode')}+{b.get('mode')}", "tasks": names, "direction_to_task": directions}
    if sorted(target["tasks"]) != sorted(names):
        raise CheckpointToolError(f"--data-dir task map has tasks {target['tasks']}, the two checkpoints "
                                  f"{a['tasks']} + {b['tasks']}: the union must match exactly")
    for d, t in directions.items():
        want = target["tasks"][target["direction_to_task"].get(d, -1)] if d in target["direction_to_task"] else None
        if want != names[t]:
            raise CheckpointToolError(f"--data-dir task map puts direction {d} in task {want!r}, the checkpoints "
                                      f"in {names[t]!r}")
    return copy.deepcopy(target)


def _row_names(meta: dict, source: str) -> list[str]:
    return list(meta["task_map"]["tasks"]) if source == "task" else list(meta["languages"])


def merge_rows(t_a: torch.Tensor, t_b: torch.Tensor, names_a: list[str], names_b: list[str], names: list[str],
               weight: float, what: str) -> torch.Tensor:
    """Rows of a task table in the union id space by name; a row both have is averaged."""
    out = torch.empty((len(names),) + tuple(t_a.shape[1:]), dtype=t_a.dtype)
    for i, name in enumerate(names):
        in_a, in_b = name in names_a, name in names_b
        if in_a and in_b:
            out[i] = weight * t_a[names_a.index(name)] + (1 - weight) * t_b[names_b.index(name)]
        elif in_a:
            out[i] = t_a[names_a.index(name)]
        elif in_b:
            out[i] = t_b[names_b.index(name)]
        else:
            raise CheckpointToolError(f"{what}: row {name!r} of the merged id space is in neither checkpoint")
    return out


def _side(key: str) -> str:
    return "encoder" if key.startswith("encoder.") else "decoder"


def merge(a: FullCheckpoint, b: FullCheckpoint, *, weight: float = 0.5, task_map: Optional[dict] = None,
          languages: Optional[list[str]] = None) -> FullCheckpoint:
    """The merged checkpoint (see the module docstring); `task_map`/`languages` pin the union id spaces."""
    if not 0.0 <= weight <= 1.0:
        raise CheckpointToolError(f"--weight {weight} must be in [0, 1]")
    cfg_a, cfg_b = check_mergeable(a, b)
    moe_a, moe_b = cfg_a.moe, cfg_b.moe
    merged_map = union_task_map(a.meta["task_map"], b.meta["task_map"], task_map)
    union_langs = sorted(set(a.meta["languages"]) | set(b.meta["languages"]))
    if languages is not None:
        if sorted(languages) != union_langs:
            raise CheckpointToolError(f"--data-dir languages {languages} differ from the checkpoints' union "
                                      f"{union_langs}")
        union_langs = list(languages)
    meta_u = {"task_map": merged_map, "languages": union_langs}
    adapters = moe_a.adapters
    num_adapters_a = adapters.resolved_num_adapters(moe_a.num_task_rows(adapters.task_source))
    num_adapters_b = adapters.resolved_num_adapters(moe_b.num_task_rows(adapters.task_source))
    new_adapters = (replace(adapters, num_adapters=num_adapters_a + num_adapters_b) if adapters.is_dynamic
                    else adapters)
    moe = replace(moe_a, num_tasks=len(merged_map["tasks"]), num_languages=len(union_langs), adapters=new_adapters)
    cfg = replace(cfg_a, moe=moe)

    if set(a.state) != set(b.state):
        only = sorted(set(a.state) ^ set(b.state))
        raise CheckpointToolError(f"{a.source} and {b.source} hold different tensors, e.g. {only[:3]}")
    state: dict[str, torch.Tensor] = {}
    for key in sorted(a.state):
        t_a, t_b = a.state[key].float(), b.state[key].float()
        leaf = key.rsplit(".", 1)[-1]
        if key.endswith(".router.task_embedding"):
            source = moe.side(_side(key)).task_source
            merged = merge_rows(t_a, t_b, _row_names(a.meta, source), _row_names(b.meta, source),
                                _row_names(meta_u, source), weight, key)
        elif ".adapters." in key and (leaf == "task_embedding" or (adapters.mode == "static" and leaf in ADAPTER_STACKED)):
            source = adapters.task_source
            merged = merge_rows(t_a, t_b, _row_names(a.meta, source), _row_names(b.meta, source),
                                _row_names(meta_u, source), weight, key)
        elif ".adapters." in key and leaf in ADAPTER_STACKED:
            merged = torch.cat([t_a, t_b], dim=0)
        else:
            if t_a.shape != t_b.shape:
                raise CheckpointToolError(f"{key}: shapes {tuple(t_a.shape)} and {tuple(t_b.shape)} cannot be averaged")
            merged = weight * t_a + (1 - weight) * t_b
        state[key] = merged.to(a.state[key].dtype).contiguous()
    meta = copy.deepcopy(a.meta)
    for key in ("metric", "consumed_samples", "converted_from", "extracted"):
        meta.pop(key, None)
    meta.update(task_map=merged_map, languages=union_langs, model_config=to_dict(cfg), step=0,
                merged_from={"a": {"path": a.source, "tasks": a.meta["task_map"]["tasks"], "step": a.meta.get("step")},
                             "b": {"path": b.source, "tasks": b.meta["task_map"]["tasks"], "step": b.meta.get("step")},
                             "weight": weight,
                             "adapters": {"a": list(range(num_adapters_a)),
                                          "b": list(range(num_adapters_a, num_adapters_a + num_adapters_b))}
                             if adapters.is_dynamic else None})
    return FullCheckpoint(state=state, meta=meta, tokenizer=a.tokenizer, source=f"merge({a.source}, {b.source})")


def config_overrides(cfg: ModelConfig) -> list[str]:
    """The `--set` flags that make pretrain_mt.py build the merged model from its preset (the number of dynamic
    adapters is the one field a preset derives differently: ceil(log2 G) instead of La + Lb)."""
    if cfg.moe is None or not cfg.moe.adapters.is_dynamic:
        return []
    return [f"model.overrides.moe.adapters.num_adapters={cfg.moe.adapters.num_adapters}"]
