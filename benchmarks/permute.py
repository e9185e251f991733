"""Benchmark the token permutation: ours (extension / fallback) vs megatron-core's pure-torch path vs `copy_`.

For each shape (tokens T, hidden H, experts E, top-k K) and thread count it times, forward and backward apart:
  permute        permute(tokens, routing_map, probs)                         forward
  permute-bwd    backward of permute's (permuted tokens, permuted probs)     to tokens and probs
  unpermute      unpermute(permuted, sorted_indices, shape, probs, map)      forward, probs-weighted merge
  unpermute-bwd  backward of that unpermute                                  to permuted tokens and probs
  unpermute-np   unpermute(permuted, sorted_indices, shape)                  forward, the dispatchers' call
  fwd+bwd        permute -> unpermute(probs) -> backward                     the whole round trip
  fwd (p+u)      permute + unpermute, bwd (p+u): permute-bwd + unpermute-bwd (sums of the rows above)
A backward case builds its graph untimed before each timed call. Every repeat runs every (implementation, op)
once, in an order rotated from repeat to repeat, so load from other processes hits all alike; each figure is a
median over repeats of a per-repeat quantity: the time, ours vs megatron-core (megatron's time / ours, same
repeat) and the percentage of copy bandwidth (effective GB/s over that of a plain `copy_` of N*H elements into
a preallocated buffer in the same repeat; an op's bytes are the least it must move: a row gather reads and
writes N*H elements, N = T*K, a merge reads N*H and writes T*H).

Clocks: `--clock wall` (default) is elapsed time; `--clock cpu` is the process's CPU time (all threads), which
on a shared, oversubscribed machine excludes the time the process waits for a core. With 1 thread the two agree
on an idle machine; with more threads CPU time does not credit parallel speed-up (and counts OpenMP spinning),
so use it for 1 thread only.

CPU allocation note: our CPU kernels take their outputs from a cache of recycled huge-page blocks
(`megatron_taskmoe/ops/csrc/output_cache_cpu.h`); megatron-core's ops use torch's allocator, for which glibc
maps blocks above 32 MiB afresh on every call (page faults and zeroing on first touch). THP_MEM_ALLOC_ENABLE=1
gives torch's allocator huge pages too, MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ change glibc's policy;
the header prints which of these is set.

Usage: python benchmarks/permute.py [--threads 1 2] [--dtype fp32] [--shapes 4096x512x8x2 ...] [--repeats 9]
       [--clock wall|cpu] [--device cpu|cuda] [--inner N] [--skip-fallback] [--json out.json]
"""

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from megatron.core.transformer.moe import moe_utils

from megatron_taskmoe.compat.moe import mcore_permute
from megatron_taskmoe.ops import permute, resolved_backend, unpermute

# This project's MoE layers (hidden 1024, 8 experts, top-2; micro-batches of a few thousand tokens) and larger.
DEFAULT_SHAPES = ["4096x512x8x1", "4096x1024x8x2", "8192x1024x16x2", "16384x512x32x1", "16384x1024x64x2"]
ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "THP_MEM_ALLOC_ENABLE", "TASKMOE_OPS_CACHE_MB")
OPS = ("permute", "permute-bwd", "unpermute", "unpermute-bwd", "unpermute-np", "fwd+bwd")
# Derived rows: per-repeat sums of the forward ops and of the backward ops of one dispatch round trip.
SUMS = {"fwd (p+u)": ("permute", "unpermute"), "bwd (p+u)": ("permute-bwd", "unpermute-bwd")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(kw_only=True)
class Shape:
    """One benchmark point."""

    tokens: int
    hidden: int
    experts: int
    topk: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        try:
            t, h, e, k = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"benchmarks/permute.py: --shapes entry {text!r} is not TxHxExK (e.g. 4096x512x8x2)")
        shape = cls(tokens=t, hidden=h, experts=e, topk=k)
        if min(t, h, e, k) <= 0 or k > e:
            raise SystemExit(f"benchmarks/permute.py: --shapes entry {text!r} needs positive sizes and K <= E")
        return shape


@dataclass(kw_only=True)
class Case:
    """One timed operation: `prepare` runs untimed before every timed `run(prepare())`."""

    prepare: Callable[[], object]
    run: Callable[[object], object]


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(shape.tokens, shape.experts, generator=gen)
    probs_TE, top_TK = torch.softmax(logits_TE, -1).topk(shape.topk, dim=-1)
    routing_map_TE = torch.zeros(shape.tokens, shape.experts, dtype=torch.bool).scatter_(1, top_TK, True)
    probs_TE = torch.zeros(shape.tokens, shape.experts).scatter_(1, top_TK, probs_TE)
    tokens_TH = torch.randn(shape.tokens, shape.hidden, generator=gen).to(dtype)
    return tokens_TH.to(device), routing_map_TE.to(device), probs_TE.to(device)


def cases(impl: str, tokens_TH, routing_map_TE, probs_TE) -> Dict[str, Case]:
    """The timed operations for one implementation ('megatron', 'extension' or 'torch')."""
    if impl == "megatron":
        perm, unperm = mcore_permute, moe_utils.unpermute
    else:
        perm = lambda *a, **k: permute(*a, backend=impl, **k)  # noqa: E731
        unperm = lambda *a, **k: unpermute(*a, backend=impl, **k)  # noqa: E731
    permuted_NH, permuted_probs_N, sorted_indices_N = perm(tokens_TH, routing_map_TE, probs=probs_TE)
    permuted_NH = permuted_NH.clone()
    grad_TH = torch.ones_like(tokens_TH)
    grad_NH = torch.ones_like(permuted_NH)
    grad_N = torch.ones_like(permuted_probs_N)

    def leaves():
        return tokens_TH.detach().requires_grad_(), probs_TE.detach().requires_grad_()

    def permute_graph():
        x_TH, p_TE = leaves()
        y_NH, p_N, _ = perm(x_TH, routing_map_TE, probs=p_TE)
        return (y_NH, p_N), (grad_NH, grad_N)

    def unpermute_graph():
        y_NH, p_TE = permuted_NH.detach().requires_grad_(), probs_TE.detach().requires_grad_()
        out_TH = unperm(y_NH, sorted_indices_N, tokens_TH.shape, probs=p_TE, routing_map=routing_map_TE)
        return (out_TH,), (grad_TH,)

    def fwd_bwd(_):
        x_TH, p_TE = leaves()
        y_NH, _, idx_N = perm(x_TH, routing_map_TE, probs=p_TE)
        out_TH = unperm(y_NH, idx_N, x_TH.shape, probs=p_TE, routing_map=routing_map_TE)
        out_TH.backward(grad_TH)

    def backward(graph):
        torch.autograd.backward(*graph)

    nothing = lambda: None  # noqa: E731
    return {
        "permute": Case(prepare=nothing, run=lambda _: perm(tokens_TH, routing_map_TE, probs=probs_TE)),
        "permute-bwd": Case(prepare=permute_graph, run=backward),
        "unpermute": Case(
            prepare=nothing,
            run=lambda _: unperm(
                permuted_NH, sorted_indices_N, tokens_TH.shape, probs=probs_TE, routing_map=routing_map_TE
            ),
        ),
        "unpermute-bwd": Case(prepare=unpermute_graph, run=backward),
        "unpermute-np": Case(prepare=nothing, run=lambda _: unperm(permuted_NH, sorted_indices_N, tokens_TH.shape)),
        "fwd+bwd": Case(prepare=nothing, run=fwd_bwd),
    }


def timed_rotation(
    fns: Dict[tuple, Case], repeats: int, device: str, clock: Callable[[], float], inner: int = 1
) -> Dict[tuple, List[float]]:
    """Seconds per call for every case, after one untimed warm-up call each; the order rotates per repeat.

    Each repeat times `inner` back-to-back calls (their states prepared beforehand) and divides: on a GPU one
    call of a few microseconds is shorter than the launch and synchronisation around it."""
    for case in fns.values():
        case.run(case.prepare())
    keys = list(fns)
    samples: Dict[tuple, List[float]] = {key: [] for key in keys}
    for r in range(repeats):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            states = [fns[key].prepare() for _ in range(inner)]
            if device == "cuda":
                torch.cuda.synchronize()
            start = clock()
            for state in states:
                fns[key].run(state)
            if device == "cuda":
                torch.cuda.synchronize()
            samples[key].append((clock() - start) / inner)
            del states
    return samples


def op_bytes(shape: Shape, elem: int) -> Dict[str, int]:
    """Least bytes each op moves (see the module docstring)."""
    nh = shape.tokens * shape.topk * shape.hidden * elem
    th = shape.tokens * shape.hidden * elem
    return {
        "permute": 2 * nh,
        "permute-bwd": nh + th,  # gather-sum of each token's slots
        "unpermute": nh + th,
        "unpermute-bwd": 3 * nh,  # gather grad rows, read permuted rows (probs grad), write grad rows
        "unpermute-np": nh + th,
        "fwd+bwd": 7 * nh + 2 * th,
    }


def summarize(samples: Dict[tuple, List[float]], impls: List[str], shape: Shape, elem: int,
              copy_bytes: int) -> Tuple[List[dict], float, float]:
    copy_s = samples.pop(("copy", "copy"))
    nbytes = op_bytes(shape, elem)
    for impl in impls:  # the two directions of a dispatch, as sums within each repeat
        for total, parts in SUMS.items():
            if all((impl, part) in samples for part in parts):
                samples[(impl, total)] = [sum(ts) for ts in zip(*(samples[(impl, part)] for part in parts))]
    for total, parts in SUMS.items():
        nbytes[total] = sum(nbytes[part] for part in parts)
    rows = []
    for op in OPS + tuple(SUMS):
        base = samples[("megatron", op)]
        for impl in impls:
            if (impl, op) not in samples:
                continue
            times = samples[(impl, op)]
            pct = [100 * (nbytes[op] / t) / (copy_bytes / c) for t, c in zip(times, copy_s)]
            rows.append(dict(
                op=op, impl=impl, ms=1e3 * statistics.median(times),
                gbs=nbytes[op] / statistics.median(times) / 1e9, pct_copy=statistics.median(pct),
                speedup_vs_megatron=statistics.median([b / t for b, t in zip(base, times)]),
            ))
    copy_med = statistics.median(copy_s)
    return rows, copy_med, copy_bytes / copy_med / 1e9


def run(args) -> List[dict]:
    dtype = DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    clock = CLOCKS[args.clock]
    rows = []
    impls = ["megatron", "extension", "torch"] if not args.skip_fallback else ["megatron", "extension"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for text in args.shapes:
            shape = Shape.parse(text)
            tokens_TH, routing_map_TE, probs_TE = make_inputs(shape, dtype, args.device)
            src = torch.randn(shape.tokens * shape.topk, shape.hidden, device=args.device).to(dtype)
            dst = torch.empty_like(src)
            fns = {("copy", "copy"): Case(prepare=lambda: None, run=lambda _: dst.copy_(src))}
            for impl in impls:
                if impl == "extension" and resolved_backend("auto", tokens_TH) != "extension":
                    continue
                for op, case in cases(impl, tokens_TH, routing_map_TE, probs_TE).items():
                    fns[(impl, op)] = case
            samples = timed_rotation(fns, args.repeats, args.device, clock, inner=args.inner)
            block, copy_s, copy_gbs = summarize(samples, impls, shape, elem, 2 * src.numel() * elem)
            common = dict(threads=threads, shape=text, dtype=args.dtype, clock=args.clock, copy_gbs=copy_gbs)
            block = [dict(common, **row) for row in block]
            rows += block
            print_block(block, threads, text, copy_gbs, copy_s, args)
    return rows


def print_block(rows: List[dict], threads: int, shape: str, copy_gbs: float, copy_s: float, args) -> None:
    env = " ".join(f"{k}={os.environ[k]}" for k in ENV_SETTINGS if k in os.environ) or "default allocator settings"
    print(f"\n== {shape} (TxHxExK), {args.dtype}, threads={threads}, {args.clock} clock, {env}: "
          f"copy_ {copy_s * 1e3:.2f} ms, {copy_gbs:.1f} GB/s "
          f"(medians of {args.repeats} samples of {args.inner} call(s))")
    print(f"{'op':<14} {'impl':<10} {'ms':>9} {'GB/s':>7} {'%copy':>6} {'x megatron':>10}")
    for r in rows:
        print(f"{r['op']:<14} {r['impl']:<10} {r['ms']:>9.2f} {r['gbs']:>7.1f} {r['pct_copy']:>5.0f}% "
              f"{r['speedup_vs_megatron']:>9.2f}x")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="TxHxExK entries")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: the process's CPU time (for 1 thread on a busy machine)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--inner", type=int, default=None,
                        help="calls per timed sample (default: 1 on CPU, 20 on CUDA, where one call is too short)")
    parser.add_argument("--skip-fallback", action="store_true", help="do not time the pure-torch fallback")
    parser.add_argument("--json", help="also write the rows here (written to a temporary file, then renamed)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.inner is None:
        args.inner = 20 if args.device == "cuda" else 1
    if args.repeats < 1 or min(args.threads) < 1 or args.inner < 1:
        parser.error("--repeats, --threads and --inner must be >= 1")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu measures host CPU time; use --clock wall with --device cuda")
    rows = run(args)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"rows": rows, "argv": sys.argv[1:], "torch": torch.__version__}, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
