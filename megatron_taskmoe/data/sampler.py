"""Temperature sampling over translation directions as one deterministic, infinite, resumable global stream.

Legend: N corpus sentences (flat index over all directions), D directions, C samples per block.

Stream position i -> (direction, sentence). The stream is cut into blocks of C positions; block b draws its
direction counts from a multinomial with p_d ~ n_d^(1/T) and shuffles them, from a generator seeded with
(seed, b) alone. Within a direction, the k-th draw takes sentence perm_{d,e}[k mod n_d] of epoch e = k // n_d, a
permutation seeded with (seed, d, e): a direction is walked without replacement, epoch after epoch. Because a block
depends only on (seed, b) and the per-direction counts of earlier blocks (multinomials, cheap to replay), any
position can be computed without replaying samples: restarts are exact and start-up costs no pass over the corpus.
"""

from __future__ import annotations

import numpy as np

from megatron_taskmoe.data.tokenizer import temperature_probabilities

_PERM_STREAM = 1_000_003  # separates the permutation seeds from the block seeds


class TemperatureSampler:
    """Flat sentence indices of the global stream; `__iter__` gives rank `dp_rank`'s share.

    Ranks take positions consumed_samples + dp_rank + k * dp_size: disjoint, and together exactly the stream.
    `consumed_samples` counts stream positions consumed by all ranks together (Megatron's convention).
    """

    def __init__(self, sizes, temperature: float = 5.0, seed: int = 1234, consumed_samples: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, block_size: int = 1 << 16):
        self.sizes_D = np.asarray(sizes, dtype=np.int64)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must lie in [0, dp_size={dp_size})")
        if consumed_samples < 0 or block_size < 1:
            raise ValueError("consumed_samples must be >= 0 and block_size >= 1")
        self.probs_D = temperature_probabilities(self.sizes_D, temperature)
        self.offsets_D = np.concatenate([[0], np.cumsum(self.sizes_D)[:-1]])
        self.temperature, self.seed, self.block_size = temperature, seed, block_size
        self.consumed_samples, self.dp_rank, self.dp_size = consumed_samples, dp_rank, dp_size
        self._cum_counts = [np.zeros(len(self.sizes_D), dtype=np.int64)]  # draws per direction before block b
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._block_cache: tuple[int, np.ndarray] | None = None

    def _block_rng(self, block: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, block])

    def _counts_before(self, block: int) -> np.ndarray:
        while len(self._cum_counts) <= block:
            b = len(self._cum_counts) - 1
            counts = self._block_rng(b).multinomial(self.block_size, self.probs_D)
            self._cum_counts.append(self._cum_counts[-1] + counts)
        return self._cum_counts[block]

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes_D):
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, _PERM_STREAM, d, epoch]).permutation(
                int(self.sizes_D[d]))
        return self._perms[key]

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(direction ids, flat sentence indices) of the C positions of block b."""
        if self._block_cache is not None and self._block_cache[0] == b:
            return self._block_cache[1]
        rng = self._block_rng(b)
        counts_D = rng.multinomial(self.block_size, self.probs_D)
        dirs_C = rng.permutation(np.repeat(np.arange(len(self.sizes_D)), counts_D))
        flat_C = np.empty(self.block_size, dtype=np.int64)
        before_D = self._counts_before(b)
        for d in np.flatnonzero(counts_D):
            where = np.flatnonzero(dirs_C == d)
            k = before_D[d] + np.arange(len(where))
            n = int(self.sizes_D[d])
            epochs, pos = k // n, k % n
            local = np.empty(len(where), dtype=np.int64)
            for e in np.unique(epochs):
                sel = epochs == e
                local[sel] = self._perm(int(d), int(e))[pos[sel]]
            flat_C[where] = self.offsets_D[d] + local
        self._block_cache = (b, (dirs_C, flat_C))
        return dirs_C, flat_C

    def global_indices(self, start: int, count: int) -> np.ndarray:
        """Flat sentence indices at stream positions [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            pos = start + done
            b, off = divmod(pos, self.block_size)
            take = min(count - done, self.block_size - off)
            out[done: done + take] = self.block(b)[1][off: off + take]
            done += take
        return out

    def __iter__(self):
        pos = self.consumed_samples + self.dp_rank
        while True:
            chunk = self.global_indices(pos, self.block_size * self.dp_size)[:: self.dp_size]
            for i in chunk:
                yield int(i)
            pos += self.block_size * self.dp_size
