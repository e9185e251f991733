"""Token-budget micro-batches with length bucketing, dealt to data-parallel ranks, resumable from one counter.

Legend: B sentences in a micro-batch, S source length, T target length, W samples per window, R dp ranks.

How a micro-batch is made: the global temperature-sampled stream (sampler.py) is cut into windows of W positions.
Every rank computes the same batching of a window from the sentence lengths alone (cheap numpy): sort by length
(grouped by task when `task_homogeneous`), pack greedily while B * max(padded S, padded T) <= max_tokens (or take
`batch_size` sentences), split the largest batches until the count is a multiple of R, shuffle the batch order
(seeded by the window). Micro-step j of the window gives batch j*R + r to rank r.

What "consumed samples" means: the number of stream positions in all micro-batches of all ranks up to and
including the current micro-step, i.e. window_start + sizes of the window's first (j+1)*R batches. All ranks compute
the same value; it is a prefix of the batched stream, so restarting from it rebuilds the window and continues with
micro-step j+1: exactly what the uninterrupted run would have yielded. A counter that does not fall on a micro-step
boundary is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_taskmoe.data.sampler import TemperatureSampler
from megatron_taskmoe.data.tokenizer import PAD_ID


MODEL_INPUT_KEYS = ("src_tokens", "src_padding_mask", "tgt_input", "tgt_padding_mask", "labels", "task_ids",
                    "src_lang_ids", "tgt_lang_ids")
"""The entries of a collated batch that the model's forward takes, as keyword arguments."""

BATCH_TENSOR_KEYS = (*MODEL_INPUT_KEYS, "loss_mask")
"""The model inputs and the loss mask: what a training or validation step moves to the device."""


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments from a collated batch."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS}


def to_device(batch: dict, device, *, keys: tuple[str, ...] = BATCH_TENSOR_KEYS, non_blocking: bool = False) -> dict:
    """`keys` of a collated batch moved to `device` (the other entries, e.g. `consumed_samples`, stay behind)."""
    return {k: batch[k].to(device, non_blocking=non_blocking) for k in keys}


@dataclass(kw_only=True)
class BatchingConfig:
    """How micro-batches are formed (the `data.batching` section of a run config)."""

    max_tokens: int | None = None
    """Token budget of a micro-batch: B * max(padded S, padded T) <= max_tokens; 2048 when batch_size is not set."""
    batch_size: int | None = None
    """A fixed number of sentences B per micro-batch instead of a token budget."""
    window_samples: int = 1 << 14
    """Stream positions bucketed by length together (W)."""
    task_homogeneous: bool = False
    """Every micro-batch from one task (task-level routing then needs no permutation)."""
    pad_to_multiple: int = 8
    """Pad S and T up to a multiple of this (tensor cores); independent of the parallel layout, so a run resumed
    under other sizes sees the same batches."""
    fixed_src_len: int | None = None
    """Pad every batch's sources to this length (static shapes for pipeline parallelism without
    variable_seq_lengths)."""
    fixed_tgt_len: int | None = None
    """Pad every batch's targets to this length (see fixed_src_len)."""

    def __post_init__(self):
        if self.max_tokens is None and self.batch_size is None:
            self.max_tokens = 2048
        if self.max_tokens is not None and self.batch_size is not None:
            raise ValueError("give max_tokens or batch_size, not both")
        if (self.max_tokens or 1) < 1 or (self.batch_size or 1) < 1:
            raise ValueError("max_tokens / batch_size must be >= 1")
        if self.window_samples < 1 or self.pad_to_multiple < 1:
            raise ValueError("window_samples and pad_to_multiple must be >= 1")
        for name in ("fixed_src_len", "fixed_tgt_len"):
            value = getattr(self, name)
            if value is not None and (value < 2 or value % self.pad_to_multiple):
                raise ValueError(f"{name}={value} must be >= 2 and a multiple of pad_to_multiple")

    def padded(self, lengths: np.ndarray, fixed: int | None) -> np.ndarray:
        if fixed is not None:
            return np.full_like(lengths, fixed)
        m = self.pad_to_multiple
        return -(-lengths // m) * m


def pack_window(src_len_W, tgt_len_W, task_W, cfg: BatchingConfig, dp_size: int, window: int, *,
                seed: int) -> list[np.ndarray]:
    """Batches (arrays of window offsets) of one window, a multiple of dp_size of them, in their yield order (a
    permutation seeded by `seed` and the window)."""
    s_pad = cfg.padded(np.asarray(src_len_W), cfg.fixed_src_len)
    t_pad = cfg.padded(np.asarray(tgt_len_W), cfg.fixed_tgt_len)
    longest = np.maximum(s_pad, t_pad)
    group = np.asarray(task_W) if cfg.task_homogeneous else np.zeros(len(longest), dtype=np.int64)
    order = np.lexsort((np.arange(len(longest)), t_pad, s_pad, longest, group))
    batches, start, cur_max = [], 0, 0
    for k, i in enumerate(order):
        if k > start:
            new_max = max(cur_max, longest[i])
            full = (k - start >= cfg.batch_size) if cfg.batch_size else (new_max * (k - start + 1) > cfg.max_tokens)
            if full or group[i] != group[order[start]]:
                batches.append(order[start:k])
                start, cur_max = k, 0
        cur_max = max(cur_max, longest[i])
    if len(order) > start:
        batches.append(order[start:])
    while len(batches) % dp_size:
        sizes = [len(b) for b in batches]
        big = int(np.argmax(sizes))
        if sizes[big] < 2:
            raise ValueError(f"window of {len(order)} samples cannot be dealt to {dp_size} ranks: raise "
                             "window_samples")
        b = batches.pop(big)
        batches[big:big] = [b[: len(b) // 2], b[len(b) // 2:]]
    perm = np.random.default_rng([seed, 7, window]).permutation(len(batches))
    return [batches[p] for p in perm]


def collate(samples: list[dict], cfg: BatchingConfig | None = None) -> dict:
    """Pad a list of dataset samples into the training batch dict (padding masks are True AT padding)."""
    cfg = cfg or BatchingConfig(pad_to_multiple=1)
    B = len(samples)
    S = int(cfg.padded(np.array([max(len(s["src"]) for s in samples)]), cfg.fixed_src_len)[0])
    T = int(cfg.padded(np.array([max(len(s["tgt_in"]) for s in samples)]), cfg.fixed_tgt_len)[0])
    src_BS = np.full((B, S), PAD_ID, dtype=np.int64)
    tgt_in_BT = np.full((B, T), PAD_ID, dtype=np.int64)
    labels_BT = np.full((B, T), PAD_ID, dtype=np.int64)
    for b, s in enumerate(samples):
        if len(s["src"]) > S or len(s["tgt_in"]) > T:
            raise ValueError(f"sample {s['index']} ({len(s['src'])}, {len(s['tgt_in'])} tokens) exceeds the fixed "
                             f"lengths ({S}, {T}): set max_src_len/max_tgt_len on the dataset")
        src_BS[b, : len(s["src"])] = s["src"]
        tgt_in_BT[b, : len(s["tgt_in"])] = s["tgt_in"]
        labels_BT[b, : len(s["labels"])] = s["labels"]
    src_len_B = torch.tensor([len(s["src"]) for s in samples])
    tgt_len_B = torch.tensor([len(s["tgt_in"]) for s in samples])
    tgt_padding_mask_BT = torch.arange(T)[None, :] >= tgt_len_B[:, None]
    return {
        "src_tokens": torch.from_numpy(src_BS),
        "src_padding_mask": torch.arange(S)[None, :] >= src_len_B[:, None],
        "tgt_input": torch.from_numpy(tgt_in_BT),
        "labels": torch.from_numpy(labels_BT),
        "tgt_padding_mask": tgt_padding_mask_BT,
        "loss_mask": (~tgt_padding_mask_BT).float(),
        "task_ids": torch.tensor([s["task_id"] for s in samples], dtype=torch.long),
        "src_lang_ids": torch.tensor([s["src_lang_id"] for s in samples], dtype=torch.long),
        "tgt_lang_ids": torch.tensor([s["tgt_lang_id"] for s in samples], dtype=torch.long),
    }


class TokenBatchSampler:
    """This rank's micro-batches (lists of flat dataset indices) from the global stream; see the module docstring.

    Iterating yields `(indices, consumed_samples_after_this_micro_step)`; `consumed_samples` is that value for the
    last yielded batch (the number to store in a checkpoint). The order of a window's batches is seeded by the
    sampler's seed.
    """

    def __init__(self, sampler, src_lengths_N, tgt_lengths_N, task_ids_N, cfg: BatchingConfig, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must lie in [0, dp_size={dp_size})")
        self.sampler, self.cfg = sampler, cfg
        self.src_lengths_N, self.tgt_lengths_N, self.task_ids_N = src_lengths_N, tgt_lengths_N, task_ids_N
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples
        W = cfg.window_samples
        self._window, rem = divmod(consumed_samples, W)
        _, batches = self._batches(self._window)
        bounds = np.concatenate([[0], np.cumsum([len(b) for b in batches])])[:: dp_size]
        hits = np.flatnonzero(bounds == rem)
        if len(hits) == 0:
            raise ValueError(f"consumed_samples={consumed_samples} is not at a micro-step boundary of this "
                             "batching (different max_tokens/window/dp size than the run that saved it?)")
        self._step = int(hits[0])  # next micro-step within the window

    def _batches(self, window: int):
        W = self.cfg.window_samples
        flat_W = self.sampler.global_indices(window * W, W)
        batches = pack_window(self.src_lengths_N[flat_W], self.tgt_lengths_N[flat_W], self.task_ids_N[flat_W],
                              self.cfg, self.dp_size, window, seed=self.sampler.seed)
        return flat_W, batches

    def __iter__(self):
        W = self.cfg.window_samples
        while True:
            flat_W, batches = self._batches(self._window)
            sizes = np.array([len(b) for b in batches])
            while self._step * self.dp_size < len(batches):
                j = self._step
                mine = batches[j * self.dp_size + self.dp_rank]
                self.consumed_samples = self._window * W + int(sizes[: (j + 1) * self.dp_size].sum())
                self._step += 1
                yield flat_W[mine].tolist(), self.consumed_samples
            self._window, self._step = self._window + 1, 0


class BatchIterator:
    """Training batches for one data-parallel rank: sampler + token batcher + collation.

    Each batch dict also carries `consumed_samples` (int): the global counter after this micro-step, to be saved in
    checkpoints and passed back here on resume. `seed` seeds the sampler and the order of the batches.
    """

    def __init__(self, dataset, *, temperature: float = 5.0, batching: BatchingConfig, seed: int = 1234,
                 dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0):
        self.dataset, self.batching = dataset, batching
        self.sampler = TemperatureSampler(dataset.sizes_D, temperature, seed=seed)
        self.batcher = TokenBatchSampler(self.sampler, dataset.src_lengths_N, dataset.tgt_lengths_N,
                                         dataset.task_ids_N, batching, dp_rank, dp_size, consumed_samples)
        self._it = iter(self.batcher)

    @property
    def consumed_samples(self) -> int:
        return self.batcher.consumed_samples

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        indices, consumed = next(self._it)
        batch = collate([self.dataset[i] for i in indices], self.batching)
        batch["consumed_samples"] = consumed
        return batch


def eval_batches(dataset, direction: str, *, max_tokens: int = 4096, pad_to_multiple: int = 1):
    """Batches over one direction in length order, each with `indices` (sentence numbers within the direction).

    For validation/BLEU: every sentence once, no sampling; `indices` puts hypotheses back in corpus order.
    """
    d = dataset.directions.index(direction)
    lo, hi = int(dataset.offsets_D[d]), int(dataset.offsets_D[d + 1])
    cfg = BatchingConfig(max_tokens=max_tokens, pad_to_multiple=pad_to_multiple, window_samples=max(hi - lo, 1))
    batches = pack_window(dataset.src_lengths_N[lo:hi], dataset.tgt_lengths_N[lo:hi],
                          np.zeros(hi - lo, dtype=np.int64), cfg, 1, 0, seed=1234)
    for b in sorted(batches, key=lambda b: int(b[0])):
        offsets = np.sort(b)
        batch = collate([dataset[lo + int(i)] for i in offsets], cfg)
        batch["indices"] = torch.from_numpy(offsets)
        yield batch
