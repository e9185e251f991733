"""Beam decoding attention: our never-reordered cache (kernel and pure-torch path) against a reordered cache, and
the cross-attention kernel against torch's attention.

    python benchmarks/beam_attention.py [--dtypes fp32 bf16] [--lengths 16 48 80] [--batch 32] [--beam 4]
                                        [--system moe_task_shared_dynamic] [--tokens 64] [--repeats 5]

1. One self-attention step of one layer at the paper's width (16 heads of 64; rows = batch x beam), after a beam
   reorder, at several cached lengths t, by three paths:
   * reordered (the peer): the usual layout, as fairseq's and our former cache: per-row keys/values [N, H, T, Dh]
     copied to the rows' parents at every reorder (`index_select` into spare buffers), then torch's
     `scaled_dot_product_attention`;
   * torch: `ops.beam_attention`'s pure-torch path: each row's history gathered through the ancestry table, then
     the same SDPA;
   * kernel: `torch.ops.taskmoe.beam_decode_attention` (csrc/beam_attention_cpu.cpp): every cached key/value read
     once, nothing copied.
   It prints the best time per step of each (over `--repeats`, the paths taking turns) and the reordered path's time
   over the kernel's.
2. One cross-attention step of one layer (same width): the K hypotheses of each sentence against its encoder
   keys/values over S = the --lengths source positions (a quarter of them padding), by torch's
   `scaled_dot_product_attention` with the source mask (the peer; `ops.beam_attention`'s torch path) and by
   `torch.ops.taskmoe.beam_cross_attention`; torch's time over the kernel's.
3. Whole beam search (benchmarks/decode.py's paper-width model, random weights, `--batch` sentences of 10-40 source
   tokens, beam `--beam`, every output forced to `--tokens` tokens) with both kernels and with both torch paths
   (`attention_backend`), taking turns; in fp32 the outputs must be the same (in bf16 the two round differently,
   the kernels from one fp32 accumulation, and hypotheses that score close can swap). It prints target tokens/s of
   each and their ratio.

CPU only (the kernels are CPU kernels; on a GPU every path is torch's).

Legend: B batch, K beam, N = B*K rows, H heads, T capacity, t cached positions, S source positions, Dh head dim.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode  # noqa: E402  (benchmarks/decode.py: the paper-width model and test set; sets up sys.path)

from megatron_taskmoe.generation import SearchConfig, beam_search  # noqa: E402
from megatron_taskmoe.model.decoding import ModelDecoder, encode_batch  # noqa: E402
from megatron_taskmoe.ops.beam_attention import (  # noqa: E402
    beam_cross_attention,
    beam_decode_attention,
    kernel_available,
)
from megatron_taskmoe.parallel import groups  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADS, HEAD_DIM = 16, 64


def best_of(paths: dict, repeats: int) -> dict:
    """Each path's best time (s); the paths take turns, one warm-up call each."""
    for fn in paths.values():
        fn()
    best = {name: math.inf for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def step_paths(B: int, K: int, t: int, dtype: torch.dtype) -> dict:
    """The three paths of one step (module docstring), on random caches of t positions, after a random reorder."""
    g = torch.Generator().manual_seed(t)
    N, T = B * K, t + 1
    scale = HEAD_DIM ** -0.5
    query = torch.randn(N, HEADS, 1, HEAD_DIM, generator=g).to(dtype)
    parent_N = torch.arange(B).repeat_interleave(K) * K + torch.randint(0, K, (N,), generator=g)
    rows = [torch.randn(N, HEADS, T, HEAD_DIM, generator=g).to(dtype) for _ in range(2)]
    spare = [torch.empty_like(x) for x in rows]

    def reordered():
        for src, dst in zip(rows, spare):
            torch.index_select(src[:, :, :t], 0, parent_N, out=dst[:, :, :t])
        return F.scaled_dot_product_attention(query, spare[0][:, :, :t], spare[1][:, :, :t], scale=scale)

    caches = [torch.randn(B, HEADS, T, K, HEAD_DIM, generator=g).to(dtype) for _ in range(2)]
    slots_L = torch.arange(B)
    ancestry_NT = torch.randint(0, K, (N, T), generator=g)
    ours = {backend: (lambda backend=backend: beam_decode_attention(query, *caches, slots_L, ancestry_NT, t, scale,
                                                                   backend=backend))
            for backend in ("torch", "extension")}
    return {"reordered": reordered, "torch": ours["torch"], "kernel": ours["extension"]}


def cross_paths(B: int, K: int, S: int, dtype: torch.dtype) -> dict:
    """The two paths of one cross-attention step (module docstring), on random keys/values of S source positions."""
    g = torch.Generator().manual_seed(S)
    query = torch.randn(B, HEADS, K, HEAD_DIM, generator=g).to(dtype)
    key, value = (torch.randn(B, HEADS, S, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    allowed = torch.arange(S).unsqueeze(0) < torch.randint(S - S // 4, S + 1, (B, 1), generator=g)
    return {backend: (lambda backend=backend: beam_cross_attention(query, key, value, allowed, HEAD_DIM ** -0.5,
                                                                   backend=backend))
            for backend in ("torch", "extension")}


def whole_search(args, dtype: torch.dtype) -> None:
    model, _ = decode.build_ours("paper_width", args.system, args.tokens + 2, torch.device("cpu"), dtype)
    batch = decode.batches(decode.test_set(args.batch, decode.SIZES["paper_width"]["vocab_size"]), args.batch,
                           "cpu")[0]
    search = SearchConfig(beam_size=args.beam, max_len_a=0.0, max_len_b=args.tokens, min_len=args.tokens)
    outs = {}

    def run(backend):
        state = encode_batch(model, batch, torch.device("cpu"))
        decoder = ModelDecoder(model, state, beam_size=args.beam, max_length=args.tokens + 1,
                               attention_backend=backend)
        outs[backend] = beam_search(decoder, **decode.search_kwargs(batch, search, "cpu"))

    best = best_of({"kernel": lambda: run("extension"), "torch": lambda: run("torch")}, max(1, args.repeats // 2))
    tokens = args.batch * args.tokens
    same = "yes" if outs["extension"] == outs["torch"] else "NO"
    print(f"  whole search, paper width, {args.system}, batch {args.batch}, beam {args.beam}, {args.tokens} tokens: "
          f"kernel {tokens / best['kernel']:.0f} tok/s, torch path {tokens / best['torch']:.0f} tok/s, "
          f"{best['torch'] / best['kernel']:.2f}x; same outputs: {same}", flush=True)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[16, 48, 80],
                        help="cached positions t (self-attention) and source positions S (cross-attention)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--system", default="moe_task_shared_dynamic", help="whole-search model (a preset)")
    parser.add_argument("--tokens", type=int, default=64, help="target tokens per output in the whole search")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-search", action="store_true", help="only the single-step comparison")
    args = parser.parse_args()
    if not kernel_available():
        parser.error("the beam attention operator is not built: pip install --no-build-isolation -e .")
    if args.threads:
        torch.set_num_threads(args.threads)
    decode.compat.apply()
    groups.init_distributed(rank=0, world_size=1, master_port=groups.free_port())
    groups.initialize_model_parallel()
    print(f"CPU, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; rows = {args.batch} x beam "
          f"{args.beam}, {HEADS} heads of {HEAD_DIM}")
    for name in args.dtypes:
        dtype = DTYPES[name]
        print(f"{name}: ms per step of one layer   {'t':>4s} {'reordered':>10s} {'torch':>8s} {'kernel':>8s} "
              f"{'reordered/kernel':>17s}")
        for t in args.lengths:
            best = best_of(step_paths(args.batch, args.beam, t, dtype), args.repeats * 4)
            print(f"{'':31s} {t:4d} {best['reordered'] * 1e3:10.2f} {best['torch'] * 1e3:8.2f} "
                  f"{best['kernel'] * 1e3:8.2f} {best['reordered'] / best['kernel']:16.2f}x", flush=True)
        print(f"{name}: cross-attention, ms per step  {'S':>4s} {'torch':>8s} {'kernel':>8s} {'torch/kernel':>13s}")
        for S in args.lengths:
            best = best_of(cross_paths(args.batch, args.beam, S, dtype), args.repeats * 4)
            print(f"{'':31s} {S:4d} {best['torch'] * 1e3:8.2f} {best['extension'] * 1e3:8.2f} "
                  f"{best['torch'] / best['extension']:12.2f}x", flush=True)
        if not args.no_search:
            whole_search(args, dtype)
    groups.destroy()


if __name__ == "__main__":
    main()
