"""Numerical checks the tools run on what they write: logits of two checkpoints on one fixed batch.

A fixed, seeded batch in the trainer's batch format (ragged padding on both sides, every task and language id of
the model represented) is run through the one-process model of each checkpoint; the largest absolute logit
difference is the figure the tools print and the tests bound (1e-5 in fp32 for a conversion). Logits in a parallel
layout: `layout_jobs.logits_in_layout`.

Legend: B batch, S source length, T target length, V vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_taskmoe.checkpoint_tools.full import FullCheckpoint
from megatron_taskmoe.checkpoint_tools.models import model_from_full
from megatron_taskmoe.model.config import ModelConfig


def fixed_batch(cfg: ModelConfig, *, batch: int = 6, src_len: int = 11, tgt_len: int = 9, seed: int = 0,
                task_ids: Optional[list[int]] = None) -> dict[str, torch.Tensor]:
    """A deterministic batch; `task_ids` pins the rows' tasks (cycled), else tasks cycle through all ids."""
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.vocab_size
    num_tasks = cfg.moe.num_tasks if cfg.moe else 1
    num_langs = cfg.moe.num_languages if cfg.moe else 1
    src_BS = torch.randint(4, vocab, (batch, src_len), generator=g)
    tgt_BT = torch.randint(4, vocab, (batch, tgt_len), generator=g)
    labels_BT = torch.cat([tgt_BT[:, 1:], torch.full((batch, 1), 3)], dim=1)
    tgt_BT[:, 0] = 2
    src_real_B = torch.randint(max(2, src_len // 2), src_len + 1, (batch,), generator=g)
    tgt_real_B = torch.randint(max(2, tgt_len // 2), tgt_len + 1, (batch,), generator=g)
    src_real_B[0], tgt_real_B[0] = src_len, tgt_len
    src_mask_BS = torch.arange(src_len)[None, :] >= src_real_B[:, None]
    tgt_mask_BT = torch.arange(tgt_len)[None, :] >= tgt_real_B[:, None]
    src_BS[src_mask_BS], tgt_BT[tgt_mask_BT], labels_BT[tgt_mask_BT] = 0, 0, 0
    ids = task_ids if task_ids else list(range(num_tasks))
    task_B = torch.tensor([ids[i % len(ids)] for i in range(batch)], dtype=torch.long)
    return dict(src_tokens=src_BS, src_padding_mask=src_mask_BS, tgt_input=tgt_BT, tgt_padding_mask=tgt_mask_BT,
                labels=labels_BT, loss_mask=(~tgt_mask_BT).float(), task_ids=task_B,
                src_lang_ids=torch.arange(batch) % num_langs, tgt_lang_ids=(torch.arange(batch) + 1) % num_langs)


@torch.no_grad()
def model_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] at real target positions (padding positions zeroed: they are not outputs)."""
    keys = ("src_tokens", "src_padding_mask", "tgt_input", "tgt_padding_mask", "task_ids", "src_lang_ids",
            "tgt_lang_ids")
    logits_BTV = model(**{k: batch[k] for k in keys})
    return logits_BTV.masked_fill(batch["tgt_padding_mask"].unsqueeze(-1), 0.0)


def checkpoint_logits(ckpt: FullCheckpoint, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model_logits(model_from_full(ckpt), batch)


def max_logit_difference(a: FullCheckpoint, b: FullCheckpoint, batch: Optional[dict] = None) -> float:
    batch = batch if batch is not None else fixed_batch(a.model_config())
    return float((checkpoint_logits(a, batch) - checkpoint_logits(b, batch)).abs().max())

