"""Training-step throughput of task-based MoE (shared-dynamic) against token-MoE of the same sizes, in one process;
or the cost of the routing telemetry (`--telemetry`).

    python benchmarks/train_step.py [--size tiny|small] [--steps 20] [--batch 32] [--src-len 48] [--tgt-len 48]
    python benchmarks/train_step.py --telemetry [--system moe_task_shared_dynamic] [--log-interval 10] [--clock cpu]

Both models are built from the presets (`moe_task_shared_dynamic` and `moe_token` at one size), trained on the same
random batches (forward, backward, Adam step) with the measurements interleaved (A, B, A, B, ...) so machine noise
hits both alike; the best of the repeats is reported. Goal: task information costs at most 5% throughput,
i.e. ratio task/token >= 0.95. Runs on the GPU when there is one (bf16), else on the CPU (fp32).

`--telemetry` trains one model of `--system` with its routing counters off and on, alternately (the same weights,
batches and optimizer): "on" counts every micro-batch on the device and, every `--log-interval` steps (the trainer's
default is 10), reduces, summarises and writes the `routing` record to metrics.jsonl and TensorBoard in a temporary
directory, as the trainer does (`training/routing_telemetry.py`). Goal: at most 2% step time, i.e. ratio on/off of
the step time <= 1.02. The time spent counting (every router's and adapter block's `_record_stats`) and logging is
also timed directly and printed as a share of the step without telemetry: on a shared machine the noise of whole
steps exceeds 2%, the direct figure does not. `--clock cpu` times with this process's CPU time instead of the wall
clock (with one thread, less sensitive to other jobs; not for GPUs).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from dataclasses import replace

import torch

warnings.filterwarnings("ignore")
logging.getLogger("megatron").setLevel(logging.ERROR)


# Benchmark sizes beside the presets: "small" (CPU-friendly) and "paper_width" (the paper's layer width, d 1024,
# FFN 4096, 16 heads, with 2+2 layers so that it fits a CPU run); the adapters keep the paper's 256 hidden units.
SIZES = {
    "small": dict(hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8, encoder_layers=4, decoder_layers=4),
    "paper_width": dict(hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16, encoder_layers=2,
                        decoder_layers=2),
}


def build(system: str, size: str, num_tasks: int, vocab: int):
    from megatron_taskmoe.model import presets
    from megatron_taskmoe.model.encdec import EncoderDecoderModel

    overrides = dict(vocab_size=vocab)
    if size in SIZES:
        base = presets.tiny(vocab_size=vocab, max_source_positions=128, max_target_positions=128, **SIZES[size])
        cfg = presets.SYSTEMS[system](base)
    else:
        cfg = presets.get(system, size, **overrides)
    cfg = replace(cfg, moe=replace(cfg.moe, num_tasks=num_tasks, num_languages=num_tasks))
    torch.manual_seed(0)
    model = EncoderDecoderModel(cfg)
    if torch.cuda.is_available():
        model = model.cuda().to(torch.bfloat16)
    return model, cfg


def make_batch(B: int, S: int, T: int, vocab: int, num_tasks: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {
        "src_tokens": torch.randint(4, vocab, (B, S), generator=g),
        "src_padding_mask": torch.zeros(B, S, dtype=torch.bool),
        "tgt_input": torch.randint(4, vocab, (B, T), generator=g),
        "tgt_padding_mask": torch.zeros(B, T, dtype=torch.bool),
        "labels": torch.randint(4, vocab, (B, T), generator=g),
        "task_ids": torch.randint(0, num_tasks, (B,), generator=g),
        "src_lang_ids": torch.randint(0, num_tasks, (B,), generator=g),
        "tgt_lang_ids": torch.randint(0, num_tasks, (B,), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def time_steps(model, optimizer, batch, steps: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).float().mean()
        loss.backward()
        optimizer.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_telemetry(args, device) -> None:
    """The routing telemetry's cost: the same model's steps with the counters off and on, interleaved."""
    import tempfile

    from megatron_taskmoe.model.moe import set_routing_telemetry
    from megatron_taskmoe.training.metrics import MetricsWriter
    from megatron_taskmoe.training.routing_telemetry import RoutingTelemetry

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model, cfg = build(args.system, args.size, args.tasks, args.vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = make_batch(args.batch, args.src_len, args.tgt_len, args.vocab, args.tasks, device)
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_taskmoe.model.adapters import TaskAdapters
    from megatron_taskmoe.model.router import TaskTopKRouter

    # The counting itself, timed directly (robust to noise that hits the whole step): every router's and adapter
    # block's `_record_stats`, which only telemetry calls here (validation statistics are off).
    counted = {"seconds": 0.0}

    def timed(method):
        def wrapper(*a, **k):
            t0 = clock()
            method(*a, **k)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            counted["seconds"] += clock() - t0
        return wrapper

    for cls in (TaskTopKRouter, TaskAdapters):
        cls._record_stats = timed(cls._record_stats)
    tasks = [f"task{g}" for g in range(args.tasks)]
    steps = args.steps - args.steps % args.log_interval or args.log_interval  # whole log intervals per repeat
    with tempfile.TemporaryDirectory() as run_dir:
        writer = MetricsWriter(run_dir)
        telemetry = RoutingTelemetry(model, ProcessGroupCollection.use_mpu_process_groups(), task_names=tasks)
        logged = {"step": 0, "seconds": 0.0, "count": 0}

        def run(on: bool) -> float:
            set_routing_telemetry(model, on)
            telemetry.enabled = on
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = clock()
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = model(**batch).float().mean()
                loss.backward()
                optimizer.step()
                logged["step"] += 1
                if on and logged["step"] % args.log_interval == 0:
                    t0 = clock()
                    telemetry.log(logged["step"], writer)
                    logged["seconds"] += clock() - t0
                    logged["count"] += 1
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return clock() - start

        run(False), run(True)  # warm-up (allocations, lazy init, TensorBoard's writer)
        logged.update(seconds=0.0, count=0)
        counted.update(seconds=0.0)
        off, on = [], []
        for _ in range(args.repeats):
            off.append(run(False))
            on.append(run(True))
        writer.close()
    ratios = sorted(b / a for a, b in zip(off, on))
    print(f"device: {device}, {args.system} size {args.size} (d {cfg.hidden_size}, FFN {cfg.ffn_hidden_size}, "
          f"{cfg.encoder_layers}+{cfg.decoder_layers} layers, {cfg.num_moe_layers()} MoE layers, "
          f"{cfg.moe.num_experts} experts, top-{cfg.moe.topk}, adapters {cfg.moe.adapters.mode}), batch {args.batch} x "
          f"({args.src_len}+{args.tgt_len}) tokens, {args.tasks} tasks, threads {torch.get_num_threads()}, "
          f"{steps} steps per repeat, a routing record every {args.log_interval} steps, {args.clock} clock")
    step_off = sorted(off)[len(off) // 2] / steps
    count_step = counted["seconds"] / (steps * args.repeats)
    log_once = logged["seconds"] / max(logged["count"], 1)
    print(f"telemetry off {min(off) / steps * 1e3:8.1f} ms/step (best of {args.repeats}), median "
          f"{step_off * 1e3:.1f}")
    print(f"telemetry on  {min(on) / steps * 1e3:8.1f} ms/step (best of {args.repeats}), median "
          f"{sorted(on)[len(on) // 2] / steps * 1e3:.1f}")
    per_step = count_step + log_once / args.log_interval
    print(f"counting {count_step * 1e3:.2f} ms/step (all routers and adapter gates, all micro-batches), one log "
          f"(reduce, record, jsonl + TensorBoard) {log_once * 1e3:.1f} ms: {per_step * 1e3:.2f} ms/step = "
          f"{per_step / step_off:.2%} of the median step without telemetry (goal <= 2%)")
    print(f"ratio on/off step time: best {min(on) / min(off):.4f}, median of interleaved pairs "
          f"{ratios[len(ratios) // 2]:.4f} (the direct figure above is the steadier one on a shared machine)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small", "paper_width", "paper_base"], default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--src-len", type=int, default=32)
    parser.add_argument("--tgt-len", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--telemetry", action="store_true", help="measure the routing telemetry's cost instead")
    parser.add_argument("--system", default="moe_task_shared_dynamic", help="with --telemetry: the preset system")
    parser.add_argument("--log-interval", type=int, default=10, help="with --telemetry: steps per routing record")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="with --telemetry: wall clock, or this process's CPU time")
    args = parser.parse_args()
    if args.log_interval < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--log-interval, --steps and --repeats must be >= 1")

    from megatron_taskmoe import compat
    from megatron_taskmoe.parallel import groups

    compat.apply()
    groups.init_distributed(rank=0, world_size=1, master_port=groups.free_port())
    groups.initialize_model_parallel()
    groups.model_parallel_manual_seed(0)
    device = groups.device()
    if args.telemetry:
        time_telemetry(args, device)
        groups.destroy()
        return
    systems = ["moe_token", "moe_task_shared_dynamic"]
    models = {s: build(s, args.size, args.tasks, args.vocab) for s in systems}
    opts = {s: torch.optim.Adam(m.parameters(), lr=1e-4) for s, (m, _) in models.items()}
    batch = make_batch(args.batch, args.src_len, args.tgt_len, args.vocab, args.tasks, device)
    tokens = args.batch * (args.src_len + args.tgt_len)
    for s in systems:  # warm-up (allocations, lazy init)
        time_steps(models[s][0], opts[s], batch, 2)
    best = {s: float("inf") for s in systems}
    for _ in range(args.repeats):
        for s in systems:
            best[s] = min(best[s], time_steps(models[s][0], opts[s], batch, args.steps))
    cfg = models["moe_token"][1]
    print(f"device: {device}, size {args.size} (d {cfg.hidden_size}, FFN {cfg.ffn_hidden_size}, "
          f"{cfg.encoder_layers}+{cfg.decoder_layers} layers, {cfg.moe.num_experts} experts, top-{cfg.moe.topk}), "
          f"batch {args.batch} x ({args.src_len}+{args.tgt_len}) tokens, {args.tasks} tasks, threads "
          f"{torch.get_num_threads()}")
    rate = {}
    for s in systems:
        params = sum(p.numel() for p in models[s][0].parameters())
        rate[s] = tokens * args.steps / best[s]
        print(f"{s:26s} {rate[s]:12,.0f} tokens/s   {best[s] / args.steps * 1e3:8.1f} ms/step   {params:,} params")
    ratio = rate["moe_task_shared_dynamic"] / rate["moe_token"]
    print(f"ratio task/token throughput: {ratio:.3f} (goal >= 0.95: task information costs at most 5%)")
    groups.destroy()


if __name__ == "__main__":
    main()
