"""Benchmark the token permutation: ours (extension / fallback) vs megatron-core's pure-torch path vs `copy_`.

For each shape (tokens T, hidden H, experts E, top-k K) and thread count it times:
  permute       permute(tokens, routing_map, probs)                            (forward)
  unpermute     unpermute(permuted, sorted_indices, shape, probs, routing_map) (forward, probs-weighted merge)
  unpermute-np  unpermute(permuted, sorted_indices, shape)                     (forward, the dispatchers' call)
  fwd+bwd       permute -> unpermute(probs) -> backward                        (both ops, forward and backward)
and prints the best-of-repeats time (all variants take turns in every repeat), effective GB/s (the bytes each op
must move at least: a row gather reads and writes N*H elements, N = T*K), the percentage of the bandwidth of a
plain `copy_` of N*H elements, and the speed-up over megatron-core. `--device cuda` gives the same table on a GPU
(timing around torch.cuda.synchronize()).

CPU note: every op allocates its outputs. glibc serves large blocks with fresh mmap()s, so each call pays page
faults on first touch, which on some VMs costs more than the copy itself; `copy_` into a preallocated buffer
does not. Run with MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 (or
THP_MEM_ALLOC_ENABLE=1) to see the kernels without that cost; the header prints which setting was active.

Usage: python benchmarks/permute.py [--threads 1 2] [--dtype fp32] [--shapes 4096x512x8x2 ...] [--repeats 5]
       [--device cpu|cuda] [--json out.json]
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch

from megatron.core.transformer.moe import moe_utils

from megatron_taskmoe.ops import permute, resolved_backend, unpermute

# This project's MoE layers (hidden 1024, 8 experts, top-2; micro-batches of a few thousand tokens) and larger.
DEFAULT_SHAPES = ["4096x512x8x1", "4096x1024x8x2", "8192x1024x16x2", "16384x512x32x1", "16384x1024x64x2"]
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "THP_MEM_ALLOC_ENABLE")
OPS = ("permute", "unpermute", "unpermute-np", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(shape.tokens, shape.experts, generator=gen)
    probs_TE, top_TK = torch.softmax(logits_TE, -1).topk(shape.topk, dim=-1)
    routing_map_TE = torch.zeros(shape.tokens, shape.experts, dtype=torch.bool).scatter_(1, top_TK, True)
    probs_TE = torch.zeros(shape.tokens, shape.experts).scatter_(1, top_TK, probs_TE)
    tokens_TH = torch.randn(shape.tokens, shape.hidden, generator=gen).to(dtype)
    return tokens_TH.to(device), routing_map_TE.to(device), probs_TE.to(device)


def timed_round_robin(fns: Dict[tuple, Callable[[], object]], repeats: int, device: str) -> Dict[tuple, float]:
    """Best-of-`repeats` seconds per function, after one warm-up call each.

    The functions take turns within every repeat, so a burst of load from other processes hits all of them alike;
    the minimum is the least disturbed sample.
    """
    for fn in fns.values():
        fn()
    best = {key: float("inf") for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def cases(impl: str, tokens_TH, routing_map_TE, probs_TE) -> Dict[str, Callable[[], object]]:
    """The three timed operations for one implementation ('megatron', 'extension' or 'torch')."""
    if impl == "megatron":
        perm, unperm = moe_utils.permute, moe_utils.unpermute
    else:
        perm = lambda *a, **k: permute(*a, backend=impl, **k)  # noqa: E731
        unperm = lambda *a, **k: unpermute(*a, backend=impl, **k)  # noqa: E731
    permuted_NH, _, sorted_indices_N = perm(tokens_TH, routing_map_TE, probs=probs_TE)
    permuted_NH = permuted_NH.clone()
    grad_TH = torch.ones_like(tokens_TH)

    def fwd_bwd():
        x_TH = tokens_TH.detach().requires_grad_()
        p_TE = probs_TE.detach().requires_grad_()
        y_NH, _, idx_N = perm(x_TH, routing_map_TE, probs=p_TE)
        out_TH = unperm(y_NH, idx_N, x_TH.shape, probs=p_TE, routing_map=routing_map_TE)
        out_TH.backward(grad_TH)

    return {
        "permute": lambda: perm(tokens_TH, routing_map_TE, probs=probs_TE),
        "unpermute": lambda: unperm(
            permuted_NH, sorted_indices_N, tokens_TH.shape, probs=probs_TE, routing_map=routing_map_TE
        ),
        "unpermute-np": lambda: unperm(permuted_NH, sorted_indices_N, tokens_TH.shape),
        "fwd+bwd": fwd_bwd,
    }


def op_bytes(shape: Shape, elem: int) -> Dict[str, int]:
    """Least bytes each op moves: N*H read + N*H written per row gather; unpermute writes T*H."""
    nh = shape.tokens * shape.topk * shape.hidden * elem
    th = shape.tokens * shape.hidden * elem
    # fwd+bwd: permute (2NH), unpermute (NH + TH), unpermute backward (3NH: gathered grad, permuted, grad out),
    # permute backward (NH + TH).
    return {"permute": 2 * nh, "unpermute": nh + th, "unpermute-np": nh + th, "fwd+bwd": 7 * nh + 2 * th}


def run(args) -> List[dict]:
    dtype = DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    impls = ["megatron", "extension", "torch"] if not args.skip_fallback else ["megatron", "extension"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for text in args.shapes:
            shape = Shape.parse(text)
            tokens_TH, routing_map_TE, probs_TE = make_inputs(shape, dtype, args.device)
            n_rows = shape.tokens * shape.topk
            src = torch.randn(n_rows, shape.hidden, device=args.device).to(dtype)
            dst = torch.empty_like(src)
            fns = {("copy", "copy"): lambda: dst.copy_(src)}
            for impl in impls:
                if impl == "extension" and resolved_backend("auto", tokens_TH) != "extension":
                    continue
                for op, fn in cases(impl, tokens_TH, routing_map_TE, probs_TE).items():
                    fns[(impl, op)] = fn
            times = timed_round_robin(fns, args.repeats, args.device)
            copy_s = times.pop(("copy", "copy"))
            copy_gbs = 2 * src.numel() * elem / copy_s / 1e9
            nbytes = op_bytes(shape, elem)
            for op in OPS:
                base = times[("megatron", op)]
                for impl in impls:
                    if (impl, op) not in times:
                        continue
                    t = times[(impl, op)]
                    gbs = nbytes[op] / t / 1e9
                    rows.append(
                        dict(
                            threads=threads, shape=text, dtype=args.dtype, op=op, impl=impl, ms=t * 1e3,
                            gbs=gbs, pct_copy=100 * gbs / copy_gbs, speedup_vs_megatron=base / t,
                            copy_gbs=copy_gbs,
                        )
                    )
            print_block([r for r in rows if r["threads"] == threads and r["shape"] == text], threads, text, copy_gbs,
                        copy_s)
    return rows


def print_block(rows: List[dict], threads: int, shape: str, copy_gbs: float, copy_s: float) -> None:
    malloc = " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "default malloc"
    print(f"\n== {shape} (TxHxExK), {rows[0]['dtype']}, threads={threads}, {malloc}: copy_ {copy_s * 1e3:.2f} ms, "
          f"{copy_gbs:.1f} GB/s")
    print(f"{'op':<12} {'impl':<10} {'ms':>9} {'GB/s':>7} {'%copy':>6} {'x megatron':>10}")
    for r in rows:
        print(f"{r['op']:<12} {r['impl']:<10} {r['ms']:>9.2f} {r['gbs']:>7.1f} {r['pct_copy']:>5.0f}% "
              f"{r['speedup_vs_megatron']:>9.2f}x")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="TxHxExK entries")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--skip-fallback", action="store_true", help="do not time the pure-torch fallback")
    parser.add_argument("--json", help="also write the rows here (written to a temporary file, then renamed)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.repeats < 1 or min(args.threads) < 1:
        parser.error("--repeats and --threads must be >= 1")
    rows = run(args)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"rows": rows, "argv": sys.argv[1:], "torch": torch.__version__}, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
