"""Extract the sub-network of some tasks from a task-routed MoE checkpoint (Kudugunta et al. 2021, section 3).

Why it works. In a layer routed by task (`RoutingConfig.mode == "task"`), the router's logits are a per-task table
(task embedding through the gate), so every token of a task goes to the same top-k experts with the same weights:
serving one task needs only those k experts. Kudugunta et al. call this extracting the task's sub-network and
report its size as "Serving" next to "Train" (their Table 1). Here, for the kept tasks:

  * task-routed layers keep the union U of the kept rows' top-k experts (k per layer for one task or target
    language), renumbered in their original order; the router keeps the rows of its gate for U. With renormalized
    top-k (GShard top-2, the default) a row's softmax over its top-k logits is unchanged, so the outputs are the
    same. With raw probabilities (top-1, or `renormalize_topk=False`) the softmax runs over all experts: for a
    single row the constant ratio sum_U exp(l) / sum_E exp(l) is folded into the kept experts' output weights
    (exact); for several rows with different ratios the extraction is refused. All layers of a side share one
    expert count (`RoutingConfig.num_experts`), so a layer whose U is smaller than another's is padded with its
    best unchosen experts: they are never in a kept row's top-k, so they change nothing.
  * token-, sentence- and task-token-routed layers depend on the tokens: they keep all their experts (reported).
  * the id spaces shrink to what the kept directions use: tasks are the kept tasks (new ids 0..n-1 in their old
    order), languages the languages of the kept directions (old order). Every task table (router task
    embeddings, dynamic adapters' task embeddings) and static adapters (one per task row) keep their rows, and
    `checkpoint.json`'s task map and languages change with them, so `tools/translate.py` serves exactly the kept
    directions and refuses the others. The model can be fine-tuned on a corpus whose manifest has these ids.
  * dynamic and shared-dynamic adapters are chosen per token (a gate over concat(token, task embedding)): all of
    them are kept (their number is pinned in the config, since the default derives it from the task count).
  * token dropping (`capacity_factor`): an expert's capacity is ceil(tokens * k / E * factor), so a task-routed
    side keeps the full model's E for that formula (`RoutingConfig.capacity_num_experts`): every kept expert
    accepts as many tokens as before, and on the same batch exactly the same tokens are dropped (within a task all
    tokens carry the same weights, so the drop order is the same too). Models with `pad_to_capacity` are refused:
    megatron-core's all-to-all dispatcher pads every expert to a capacity it computes from the layer's own E, which
    can exceed the batch once E shrinks.

Legend: G task-table rows, C task embedding dim, E experts, U kept experts, K top-k, D model dim.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError, FullCheckpoint
from megatron_taskmoe.checkpoint_tools.merge import ADAPTER_STACKED
from megatron_taskmoe.checkpoint_tools.verify import checkpoint_logits, fixed_batch
from megatron_taskmoe.config_io import to_dict
from megatron_taskmoe.model import routing as R
from megatron_taskmoe.model.config import ModelConfig

SIDES = ("encoder", "decoder")
_ROUTER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.mlp\.router\.weight$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts)\.(\d+)\.(.+)$")


@dataclass(kw_only=True)
class Selection:
    """What is kept: directions with their old task ids, tasks and languages in their old order."""

    directions: dict[str, int]
    """Kept direction ("de-en") -> its task id in the full model."""
    tasks: list[str]
    """Names of the kept tasks, in their order in the full model."""
    task_ids: list[int]
    """Ids of the kept tasks in the full model, ascending; new task id i is old `task_ids[i]`."""
    languages: list[str]
    """Codes of the languages of the kept directions, in their sorted order in the full model."""
    language_ids: list[int]
    """Ids of the kept languages in the full model, ascending; new language id i is old `language_ids[i]`."""
    target_language_ids: list[int]
    """Ids in the full model of the kept directions' target languages, ascending."""

    def task_map(self, old: dict) -> dict:
        new_id = {old_id: i for i, old_id in enumerate(self.task_ids)}
        return {**copy.deepcopy(old), "tasks": list(self.tasks),
                "direction_to_task": {d: new_id[t] for d, t in sorted(self.directions.items())}}

    def rows(self, task_source: str) -> list[int]:
        """Old row ids of a task table in the new id space's order."""
        return self.task_ids if task_source == "task" else self.language_ids

    def needed_rows(self, task_source: str) -> list[int]:
        """Old rows a router of this source actually reads for the kept directions."""
        return self.task_ids if task_source == "task" else self.target_language_ids


def select(meta: dict, *, tasks: Sequence[str] = (), target_langs: Sequence[str] = (), where: str = "") -> Selection:
    """The directions to keep: those of the named tasks (a task name or a direction, `--task`) and/or into the
    named target languages (`--target-lang`); both filters apply when both are given."""
    task_map, languages = meta.get("task_map") or {}, list(meta.get("languages") or [])
    names, directions = list(task_map.get("tasks", [])), dict(task_map.get("direction_to_task", {}))
    if not tasks and not target_langs:
        raise CheckpointToolError("name what to keep with --task (a task or direction) or --target-lang")
    keep = set(directions)
    if tasks:
        wanted = set()
        for name in tasks:
            if name in names:
                wanted.add(names.index(name))
            elif name in directions:
                wanted.add(int(directions[name]))
            else:
                raise CheckpointToolError(f"--task {name}: not a task or direction of {where} (tasks: "
                                          f"{', '.join(names)}; directions: {', '.join(sorted(directions))})")
        keep &= {d for d, t in directions.items() if int(t) in wanted}
    if target_langs:
        targets = {d.split("-", 1)[1] for d in directions}
        for lang in target_langs:
            if lang not in targets:
                raise CheckpointToolError(f"--target-lang {lang}: {where} has no direction into {lang!r} (target "
                                          f"languages: {', '.join(sorted(targets))})")
        keep &= {d for d in directions if d.split("-", 1)[1] in set(target_langs)}
    if not keep:
        raise CheckpointToolError(f"--task {' '.join(tasks)} with --target-lang {' '.join(target_langs)}: no "
                                  f"direction of {where} satisfies both")
    kept = {d: int(directions[d]) for d in sorted(keep)}
    task_ids = sorted(set(kept.values()))
    used = {lang for d in kept for lang in d.split("-", 1)}
    missing = sorted(used - set(languages))
    if missing:
        raise CheckpointToolError(f"{where}: directions use languages {missing} missing from the record's languages")
    language_ids = [i for i, lang in enumerate(languages) if lang in used]
    return Selection(directions=kept, tasks=[names[t] for t in task_ids], task_ids=task_ids,
                     languages=[languages[i] for i in language_ids], language_ids=language_ids,
                     target_language_ids=sorted({languages.index(d.split("-", 1)[1]) for d in kept}))


@dataclass(kw_only=True)
class LayerPlan:
    """One MoE layer's extraction: which old experts stay (new expert i = old `kept[i]`)."""

    layer: str
    """Module name prefix of the MoE layer in the model's state dict."""
    side: str
    """"encoder" or "decoder"."""
    mode: str
    """The side's routing mode (RoutingConfig.mode)."""
    task_source: str
    """The side's task_source: which id indexes the task table."""
    experts: int
    """Number of experts of the layer in the full model."""
    kept: list[int]
    """Old indexes of the experts that stay, ascending."""
    chosen: dict[str, list[int]] = field(default_factory=dict)
    """Kept row name -> its top-k old experts (task-routed layers)."""
    scale: Optional[float] = None
    """Folded into the kept experts' output weights (raw-probability routing with one row)."""
    note: str = ""
    """Human-readable remark for the extraction report (why all experts stay, padding experts added); empty if none."""

    def summary(self) -> dict:
        return {"layer": self.layer, "routing": self.mode if self.mode != "task" else f"task ({self.task_source})",
                "experts_before": self.experts, "experts_after": len(self.kept), "kept": self.kept,
                "top_k_per_row": self.chosen, "output_scale": self.scale, "note": self.note}


def _table_logits(state: dict, prefix: str, rows: list[int]) -> torch.Tensor:
    emb_GC = state[f"{prefix}.router.task_embedding"].float()[rows]
    return R.task_logit_table(emb_GC, state[f"{prefix}.router.weight"].float(), None, torch.float32)


def plan_layers(ckpt: FullCheckpoint, sel: Selection) -> list[LayerPlan]:
    cfg = ckpt.model_config()
    moe = cfg.moe
    row_names = {"task": list(ckpt.meta["task_map"]["tasks"]), "target_language": list(ckpt.meta["languages"])}
    plans = []
    routers = [(SIDES.index(m.group(1)), int(m.group(2)), m) for m in map(_ROUTER.match, ckpt.state) if m]
    for _, _, m in sorted(routers, key=lambda r: r[:2]):
        key = m.group(0)
        side, prefix = m.group(1), key[: -len(".router.weight")]
        routing = moe.side(side)
        experts = moe.side_num_experts(side)
        plan = LayerPlan(layer=prefix, side=side, mode=routing.mode, task_source=routing.task_source,
                         experts=experts, kept=list(range(experts)))
        if routing.mode != "task":
            plan.note = f"routes by {routing.mode}: the choice depends on the tokens, so all {experts} experts stay"
            plans.append(plan)
            continue
        needed = sel.needed_rows(routing.task_source)
        logits_GE = _table_logits(ckpt.state, prefix, needed)
        top_GK = torch.topk(logits_GE, k=moe.topk, dim=-1).indices
        plan.chosen = {row_names[routing.task_source][r]: sorted(top_GK[i].tolist()) for i, r in enumerate(needed)}
        plan.kept = sorted({int(e) for e in top_GK.flatten()})
        sub_top_GK = torch.topk(logits_GE[:, plan.kept], k=moe.topk, dim=-1).indices
        if any(sorted(plan.kept[int(e)] for e in sub_top_GK[i]) != sorted(top_GK[i].tolist())
               for i in range(len(needed))):
            raise CheckpointToolError(f"{prefix}: tied router logits make the kept experts' top-{moe.topk} differ "
                                      "from the full layer's; cannot extract this layer exactly")
        raw = moe.topk == 1 or not moe.renormalize_topk
        if raw:
            if len(needed) > 1:
                unit = "task" if routing.task_source == "task" else "target language"
                raise CheckpointToolError(
                    f"{prefix}: with raw (not renormalized) top-{moe.topk} probabilities the gate weights are a "
                    f"softmax over all {experts} experts, which a sub-network cannot keep for several rows "
                    f"({', '.join(plan.chosen)}); extract one {unit} at a time")
            plan.scale = float(torch.exp(torch.logsumexp(logits_GE[0, plan.kept].double(), 0)
                                         - torch.logsumexp(logits_GE[0].double(), 0)))
        plans.append(plan)
    # One expert count per side: pad smaller unions with each layer's best unchosen experts (never selected).
    for side in SIDES:
        side_plans = [p for p in plans if p.side == side and p.mode == "task"]
        if not side_plans:
            continue
        width = max(len(p.kept) for p in side_plans)
        for p in side_plans:
            if len(p.kept) < width:
                logits_E = _table_logits(ckpt.state, p.layer, sel.needed_rows(p.task_source)).max(dim=0).values
                extra = [int(e) for e in torch.argsort(logits_E, descending=True) if int(e) not in p.kept]
                p.note = f"padded with never-chosen experts {sorted(extra[: width - len(p.kept)])} to {width}"
                p.kept = sorted(p.kept + extra[: width - len(p.kept)])
    return plans


def check_extractable(cfg: ModelConfig, where: str) -> None:
    moe = cfg.moe
    if moe is None or cfg.num_moe_layers() == 0:
        raise CheckpointToolError(f"{where}: a dense model has no experts or adapters to extract")
    task_sides = [s for s in SIDES if moe.side(s).mode == "task" and sum(cfg.moe_pattern(s)) > 0]
    if not task_sides and moe.adapters.mode != "static":
        modes = ", ".join(f"{s} {moe.side(s).mode!r}" for s in SIDES if sum(cfg.moe_pattern(s)) > 0)
        raise CheckpointToolError(
            f"{where}: nothing to extract: its MoE layers route by {modes}, a choice that depends on each token, "
            "so every expert serves every task; only task-routed layers (RoutingConfig.mode='task', e.g. the "
            "token_enc_task_dec system) or static task adapters have a per-task subset")
    if task_sides and moe.pad_to_capacity:
        raise CheckpointToolError(
            f"{where}: MoEConfig.pad_to_capacity=True: megatron-core's all-to-all dispatcher pads every expert to a "
            "capacity computed from the layer's own number of experts, which a sub-network changes; only models "
            "without padding to capacity are extracted (token dropping by capacity_factor is fine)")


def extract(ckpt: FullCheckpoint, *, tasks: Sequence[str] = (), target_langs: Sequence[str] = ()
            ) -> tuple[FullCheckpoint, dict]:
    """The kept tasks' sub-network (see the module docstring) and a report of what was kept."""
    cfg = ckpt.model_config()
    check_extractable(cfg, ckpt.source)
    sel = select(ckpt.meta, tasks=tasks, target_langs=target_langs, where=ckpt.source)
    moe = cfg.moe
    plans = plan_layers(ckpt, sel)
    by_layer = {p.layer: p for p in plans}
    adapters = moe.adapters
    state: dict[str, torch.Tensor] = {}
    for key, tensor in ckpt.state.items():
        m = _EXPERT.match(key)
        if m:
            plan = by_layer[m.group(1)[: -len(".experts.local_experts")]]
            old = int(m.group(2))
            if old not in plan.kept:
                continue
            new_key = f"{m.group(1)}.{plan.kept.index(old)}.{m.group(3)}"
            if plan.scale is not None and m.group(3) == "linear_fc2.weight":
                tensor = (tensor.double() * plan.scale).to(tensor.dtype)
            state[new_key] = tensor.contiguous()
            continue
        leaf = key.rsplit(".", 1)[-1]
        side = key.split(".", 1)[0]
        if key.endswith(".router.weight") and key[: -len(".router.weight")] in by_layer:
            state[key] = tensor[by_layer[key[: -len(".router.weight")]].kept].contiguous()
        elif key.endswith(".router.task_embedding"):
            state[key] = tensor[sel.rows(moe.side(side).task_source)].contiguous()
        elif ".adapters." in key and (leaf == "task_embedding"
                                      or (adapters.mode == "static" and leaf in ADAPTER_STACKED)):
            state[key] = tensor[sel.rows(adapters.task_source)].contiguous()
        else:
            state[key] = tensor
    sides = {}
    for side in SIDES:
        side_plans = [p for p in plans if p.side == side and p.mode == "task"]
        if not side_plans:
            sides[side] = moe.side(side)
            continue
        capacity_num_experts = moe.side_capacity_experts(side) if moe.capacity_factor is not None else None
        sides[side] = replace(moe.side(side), num_experts=len(side_plans[0].kept),
                              capacity_num_experts=capacity_num_experts)
    new_adapters = adapters
    if adapters.is_dynamic:
        new_adapters = replace(adapters, num_adapters=adapters.resolved_num_adapters(
            moe.num_task_rows(adapters.task_source)))
    new_cfg = replace(cfg, moe=replace(moe, encoder=sides["encoder"], decoder=sides["decoder"], adapters=new_adapters,
                                       num_tasks=len(sel.tasks), num_languages=len(sel.languages)))
    meta = copy.deepcopy(ckpt.meta)
    for key in ("metric", "consumed_samples", "converted_from", "merged_from"):
        meta.pop(key, None)
    report = {
        "source": ckpt.source,
        "kept": {"tasks": sel.tasks, "directions": sorted(sel.directions), "languages": sel.languages},
        "layers": [p.summary() for p in plans],
        "adapters": _adapter_note(cfg, sel),
    }
    meta.update(task_map=sel.task_map(ckpt.meta["task_map"]), languages=sel.languages, model_config=to_dict(new_cfg))
    out = FullCheckpoint(state=state, meta=meta, tokenizer=ckpt.tokenizer, source=f"extract({ckpt.source})")
    report["parameters"] = {"train_all_tasks": parameter_counts(cfg, ckpt.state),
                            "serve_extracted": parameter_counts(new_cfg, state)}
    meta["extracted"] = {k: report[k] for k in ("source", "kept", "layers", "adapters", "parameters")}
    meta["extracted"]["step"] = ckpt.meta.get("step")
    return out, report


def _adapter_note(cfg: ModelConfig, sel: Selection) -> str:
    a = cfg.moe.adapters
    if a.mode == "none":
        return "no adapters"
    rows = len(sel.rows(a.task_source))
    if a.mode == "static":
        return (f"static: kept the adapters of the {rows} kept {a.task_source} row(s) of "
                f"{cfg.moe.num_task_rows(a.task_source)}")
    return (f"{a.mode}: all {a.resolved_num_adapters(cfg.moe.num_task_rows(a.task_source))} adapters kept (the task "
            "gate sees each token, so any adapter may serve the kept tasks); task embeddings reduced to the kept rows")


# ------------------------------------------------------------------------------------------------ parameters
def parameter_counts(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Total, per part (embeddings, encoder, decoder) and active per token: all parameters except the experts a
    token does not use (E - k per MoE layer) and the adapters it does not use (static: all but its task's one;
    dynamic: all but its top-k). Task tables count whole."""
    counts = {"total": 0, "embeddings": 0, "encoder": 0, "decoder": 0}
    expert_sizes: dict[str, int] = {}
    adapter_sizes: dict[str, int] = {}
    for key, t in state.items():
        n = t.numel()
        counts["total"] += n
        part = key.split(".", 1)[0]
        counts[part if part in SIDES else "embeddings"] += n
        m = _EXPERT.match(key)
        if m and m.group(2) == "0":
            expert_sizes[m.group(1)] = expert_sizes.get(m.group(1), 0) + n
        if ".adapters." in key and key.rsplit(".", 1)[-1] in ADAPTER_STACKED and not key.endswith("gate_weight"):
            layer = key.split(".adapters.", 1)[0]
            adapter_sizes[layer] = adapter_sizes.get(layer, 0) + n // t.shape[0]
    inactive = 0
    moe = cfg.moe
    if moe is not None:
        for layer, size in expert_sizes.items():
            inactive += (moe.side_num_experts(layer.split(".", 1)[0]) - moe.topk) * size
        a = moe.adapters
        if a.enabled:
            num = moe.num_task_rows(a.task_source) if a.mode == "static" else a.resolved_num_adapters(
                moe.num_task_rows(a.task_source))
            used = 1 if a.mode == "static" else a.topk
            inactive += sum((num - used) * size for size in adapter_sizes.values())
    counts["active_per_token"] = counts["total"] - inactive
    return counts


def table(report: dict) -> str:
    """Kudugunta et al.'s Table 1 columns for this model: training, serving every task, serving the kept tasks."""
    full, sub = report["parameters"]["train_all_tasks"], report["parameters"]["serve_extracted"]
    kept = ", ".join(report["kept"]["directions"])
    lines = [f"{'Train All':>14} {'Serving All':>14} {'Serving task':>14} {'Serving Dec.':>14}   (Kudugunta et al. "
             "Table 1: trained model, active per token of all tasks, extracted model, its decoder)",
             f"{full['total']:>14,} {full['active_per_token']:>14,} {sub['total']:>14,} {sub['decoder']:>14,}",
             "",
             f"{'parameters':<28} {'total':>12} {'embeddings':>11} {'encoder':>11} {'decoder':>11} {'per token':>11}"]
    lines.append("-" * len(lines[-1]))
    for name, c in (("trained model (all tasks)", full), (f"extracted ({kept})", sub)):
        lines.append(f"{name[:28]:<28} {c['total']:>12,} {c['embeddings']:>11,} {c['encoder']:>11,} "
                     f"{c['decoder']:>11,} {c['active_per_token']:>11,}")
    lines.append(f"serving {kept} needs {sub['total'] / full['total']:.1%} of the trained parameters")
    for layer in report["layers"]:
        lines.append(f"  {layer['layer']}: {layer['routing']}, experts {layer['experts_before']} -> "
                     f"{layer['experts_after']} {layer['kept']}" + (f" ({layer['note']})" if layer["note"] else ""))
    lines.append(f"  adapters: {report['adapters']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ verification
def direction_batch(full: FullCheckpoint, extracted: FullCheckpoint, **kwargs) -> tuple[dict, dict]:
    """`verify.fixed_batch` whose rows cycle through the extracted model's directions, with the ids of each
    model's id space: (batch for the full model, the same batch for the extracted model)."""
    batch = fixed_batch(extracted.model_config(), **kwargs)
    size = batch["src_tokens"].shape[0]
    directions = sorted(extracted.meta["task_map"]["direction_to_task"])
    rows = [directions[i % len(directions)].split("-", 1) for i in range(size)]
    out = []
    for ckpt in (full, extracted):
        langs, d2t = ckpt.meta["languages"], ckpt.meta["task_map"]["direction_to_task"]
        b = dict(batch)
        b["task_ids"] = torch.tensor([int(d2t[f"{s}-{t}"]) for s, t in rows])
        b["src_lang_ids"] = torch.tensor([langs.index(s) for s, _ in rows])
        b["tgt_lang_ids"] = torch.tensor([langs.index(t) for _, t in rows])
        out.append(b)
    return out[0], out[1]


def max_logit_difference(full: FullCheckpoint, extracted: FullCheckpoint) -> float:
    """Largest |logit difference| of the two models on a fixed batch of the extracted model's directions."""
    batch_full, batch_sub = direction_batch(full, extracted)
    diff = (checkpoint_logits(full, batch_full) - checkpoint_logits(extracted, batch_sub)).abs().max()
    return float(diff) if math.isfinite(float(diff)) else math.inf
