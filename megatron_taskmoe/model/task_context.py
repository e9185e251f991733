"""The explicit path of per-sequence task ids to routers and adapters.

megatron-core calls a router with `(hidden_states, padding_mask)` only, and an MLP with `(hidden_states,
padding_mask)`. Task routing and task adapters also need each token's task, so the model owns one `TaskContext`,
gives it to every router/adapter at build time (through `ModuleSpec(params=...)`), and sets the ids of the current
micro-batch around its forward:

    with model.task_context.micro_batch(task_ids_B=batch["task_ids"], tgt_lang_ids_B=batch["tgt_lang_ids"],
                                        src_padding_mask_BS=batch["src_padding_mask"],
                                        tgt_padding_mask_BT=batch["tgt_padding_mask"]):
        output = model(...)

The ids are cleared when the block exits, also on error, so a later micro-batch can never see stale ids: a router
that runs outside a micro-batch raises instead of guessing. Given `id_limits`, the ids are range-checked here, once
per micro-batch, so the layers need not check them again (on a GPU each check would be a host synchronisation).
Under pipelining each stage's forward step sets the context for the micro-batch it runs; the backward pass needs no
ids (they live in the autograd graph).

Besides ids, the context carries one tensor the model computes mid-forward: the source sentences' mean encoder
output, which decoder layers that route by sentence gate on (`set_source_mean` / `source_mean`).

Megatron flattens [S, B, D] into tokens s-major (t = s*B + b), and under sequence parallelism a router sees
[S/TP, B, D]; ids are per sequence, so `token_ids` expands them to however many local tokens there are. Activation
recomputation of MoE layers would re-run routers during backward, outside the micro-batch: it is refused loudly.

Legend: B batch, S source length, T target length (or tokens when flattened), L local sequence length.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

ID_SOURCES = ("task", "target_language", "source_language")
SIDES = ("encoder", "decoder")


@dataclass(kw_only=True)
class _MicroBatchIds:
    task_ids_B: torch.Tensor | None
    """Task id of each sentence, or None."""
    tgt_lang_ids_B: torch.Tensor | None
    """Target language id of each sentence, or None."""
    src_lang_ids_B: torch.Tensor | None
    """Source language id of each sentence, or None."""
    src_padding_mask_BS: torch.Tensor | None
    """True at source padding, or None."""
    tgt_padding_mask_BT: torch.Tensor | None
    """True at target padding, or None."""
    source_mean_BD: torch.Tensor | None = None
    """Each source sentence's mean encoder output over its real tokens (the decoder's sentence routing input), or None.
    """
    single: dict = field(default_factory=dict)
    """source -> the id every sequence shares (or None), once `single_id` has looked."""


def _check_ids(name: str, ids, batch_size: int | None, limit: int | None = None) -> torch.Tensor | None:
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"TaskContext.micro_batch: {name} must be a 1-D integer tensor [B], got {ids!r:.80}")
    if batch_size is not None and ids.shape[0] != batch_size:
        raise ValueError(f"TaskContext.micro_batch: {name} has {ids.shape[0]} entries, the batch has {batch_size}")
    if limit is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        raise ValueError(f"TaskContext.micro_batch: {name} has ids in [{int(ids.min())}, {int(ids.max())}], outside "
                         f"the model's {limit} rows (check MoEConfig.num_tasks / num_languages)")
    return ids.long()


def _check_mask(name: str, mask, batch_size: int | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"TaskContext.micro_batch: {name} must be a 2-D bool tensor [B, len], True at padding")
    if batch_size is not None and mask.shape[0] != batch_size:
        raise ValueError(f"TaskContext.micro_batch: {name} has {mask.shape[0]} rows, the batch has {batch_size}")
    return mask.bool()


class TaskContext:
    """Per-micro-batch sequence ids, read by routers and adapters; one object per model (per pipeline stage)."""

    def __init__(self, id_limits: dict[str, int] | None = None) -> None:
        """`id_limits`: the number of rows per id source ("task", "target_language", "source_language") that
        micro-batch ids must stay below."""
        self._ids: _MicroBatchIds | None = None
        self.id_limits = dict(id_limits or {})
        unknown = set(self.id_limits) - set(ID_SOURCES)
        if unknown:
            raise ValueError(f"TaskContext: id_limits has unknown sources {sorted(unknown)}; known: {list(ID_SOURCES)}")

    @property
    def active(self) -> bool:
        return self._ids is not None

    @contextlib.contextmanager
    def micro_batch(
        self,
        *,
        task_ids_B: torch.Tensor | None = None,
        tgt_lang_ids_B: torch.Tensor | None = None,
        src_lang_ids_B: torch.Tensor | None = None,
        src_padding_mask_BS: torch.Tensor | None = None,
        tgt_padding_mask_BT: torch.Tensor | None = None,
        ids_checked: bool = False,
    ):
        """Make these ids the current micro-batch's for the duration of the block (not re-entrant).

        `ids_checked=True` skips the range check of ids already checked (`check_ranges`): a decoding step's ids are
        the decoded batch's, gathered per hypothesis, and on a GPU each check is a host synchronisation."""
        if self._ids is not None:
            raise RuntimeError(
                "TaskContext.micro_batch: a micro-batch is already active (nested micro_batch blocks would mix ids)"
            )
        batch_size = None
        for tensor in (task_ids_B, tgt_lang_ids_B, src_lang_ids_B, src_padding_mask_BS, tgt_padding_mask_BT):
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1:
                batch_size = tensor.shape[0]
                break
        limits = {} if ids_checked else self.id_limits
        self._ids = _MicroBatchIds(
            task_ids_B=_check_ids("task_ids_B", task_ids_B, batch_size, limits.get("task")),
            tgt_lang_ids_B=_check_ids("tgt_lang_ids_B", tgt_lang_ids_B, batch_size, limits.get("target_language")),
            src_lang_ids_B=_check_ids("src_lang_ids_B", src_lang_ids_B, batch_size, limits.get("source_language")),
            src_padding_mask_BS=_check_mask("src_padding_mask_BS", src_padding_mask_BS, batch_size),
            tgt_padding_mask_BT=_check_mask("tgt_padding_mask_BT", tgt_padding_mask_BT, batch_size),
        )
        try:
            yield self
        finally:
            self._ids = None

    def check_ranges(self, *, task_ids_B: torch.Tensor | None = None, tgt_lang_ids_B: torch.Tensor | None = None,
                     src_lang_ids_B: torch.Tensor | None = None) -> None:
        """The range check of `micro_batch`, alone (ValueError naming the ids out of range)."""
        _check_ids("task_ids_B", task_ids_B, None, self.id_limits.get("task"))
        _check_ids("tgt_lang_ids_B", tgt_lang_ids_B, None, self.id_limits.get("target_language"))
        _check_ids("src_lang_ids_B", src_lang_ids_B, None, self.id_limits.get("source_language"))

    def _require(self, what: str) -> _MicroBatchIds:
        if self._ids is None:
            raise RuntimeError(
                f"TaskContext: {what} requested outside a micro-batch. The model must run its blocks inside "
                "`with task_context.micro_batch(...)` (activation recomputation of MoE layers is not supported "
                "with task routing/adapters, since it re-runs routers after the block has exited)."
            )
        return self._ids

    def set_source_mean(self, source_mean_BD: torch.Tensor) -> None:
        """The source sentences' representations [B, D] (masked mean of the encoder output), which the decoder's
        sentence-routed layers gate on; set by the model between its encoder and its decoder."""
        ids = self._require("the source representation")
        if source_mean_BD.dim() != 2:
            raise ValueError(f"TaskContext.set_source_mean: expected [B, D], got {tuple(source_mean_BD.shape)}")
        ids.source_mean_BD = source_mean_BD

    def source_mean(self) -> torch.Tensor:
        """The current micro-batch's source representations [B, D] (see `set_source_mean`)."""
        mean_BD = self._require("the source representation").source_mean_BD
        if mean_BD is None:
            raise RuntimeError("TaskContext: the decoder routes by the source sentence but the model set no source "
                               "representation for this micro-batch")
        return mean_BD

    def has_ids(self, source: str) -> bool:
        return self._ids is not None and self._raw_ids(self._ids, source) is not None

    @staticmethod
    def _raw_ids(ids: _MicroBatchIds, source: str) -> torch.Tensor | None:
        if source == "task":
            return ids.task_ids_B
        if source == "target_language":
            return ids.tgt_lang_ids_B
        if source == "source_language":
            return ids.src_lang_ids_B
        raise ValueError(f"TaskContext: id source {source!r} is not one of {list(ID_SOURCES)}")

    def ids(self, source: str) -> torch.Tensor:
        """Per-sequence ids [B] of `source` ("task", "target_language" or "source_language")."""
        ids_B = self._raw_ids(self._require(f"{source} ids"), source)
        if ids_B is None:
            raise RuntimeError(f"TaskContext: the current micro-batch was set without {source} ids")
        return ids_B

    def single_id(self, source: str) -> int | None:
        """The id of `source` that every sequence of the current micro-batch has, or None when they differ (or the
        batch is empty). Looked up once per micro-batch (on a GPU, one host synchronisation): a batch of one
        direction lets task-routed layers skip per-token routing (`TaskMoEMLP`'s fixed route)."""
        ids = self._require(f"{source} ids")
        if source not in ids.single:
            ids_B = self.ids(source)
            value = None
            if ids_B.numel():
                low, high = torch.stack([ids_B.min(), ids_B.max()]).tolist()
                value = low if low == high else None
            ids.single[source] = value
        return ids.single[source]

    def token_ids(self, source: str, num_tokens: int, device: torch.device | None = None) -> torch.Tensor:
        """Ids of `num_tokens` local tokens in megatron's s-major order (t = s*B + b): [num_tokens]."""
        ids_B = self.ids(source)
        batch = ids_B.shape[0]
        if batch == 0 or num_tokens % batch != 0:
            raise ValueError(
                f"TaskContext: {num_tokens} local tokens are not a whole number of positions of the batch of {batch} "
                "sequences (is the context set for this micro-batch?)"
            )
        ids_B = ids_B if device is None else ids_B.to(device, non_blocking=True)
        return ids_B.repeat(num_tokens // batch)

    def padding_mask(
        self, side: str, local_len: int, tp_rank: int = 0, tp_size: int = 1, sequence_parallel: bool = False
    ) -> torch.Tensor | None:
        """This rank's padding mask [L, B] (True at padding) for `side`, or None when the model gave none.

        Under sequence parallelism megatron gives tensor-parallel rank r the contiguous positions
        [r*L, (r+1)*L) of every sequence, so the full [B, len] mask is sliced the same way.
        """
        if side not in SIDES:
            raise ValueError(f"TaskContext: side={side!r} must be one of {list(SIDES)}")
        ids = self._require(f"{side} padding mask")
        mask_BX = ids.src_padding_mask_BS if side == "encoder" else ids.tgt_padding_mask_BT
        if mask_BX is None:
            return None
        full_len = mask_BX.shape[1]
        start = tp_rank * local_len if sequence_parallel else 0
        expected = local_len * (tp_size if sequence_parallel else 1)
        if full_len != expected:
            raise ValueError(
                f"TaskContext: the {side} padding mask covers {full_len} positions but the layer sees {local_len} "
                f"local positions (sequence_parallel={sequence_parallel}, tp_size={tp_size})"
            )
        return mask_BX[:, start : start + local_len].transpose(0, 1)
