"""Training-step throughput of task-based MoE (shared-dynamic) against token-MoE of the same sizes, in one process.

    python benchmarks/train_step.py [--size tiny|small] [--steps 20] [--batch 32] [--src-len 48] [--tgt-len 48]

Both models are built from the presets (`moe_task_shared_dynamic` and `moe_token` at one size), trained on the same
random batches (forward, backward, Adam step) with the measurements interleaved (A, B, A, B, ...) so machine noise
hits both alike; the best of the repeats is reported. Goal (issue 4): task information costs at most 5% throughput,
i.e. ratio task/token >= 0.95. Runs on the GPU when there is one (bf16), else on the CPU (fp32).
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
    args = parser.parse_args()

    from megatron_taskmoe import platform

    platform.init_distributed(rank=0, world_size=1, master_port=platform.free_port())
    platform.initialize_model_parallel()
    platform.model_parallel_manual_seed(0)
    device = platform.device()
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
    platform.destroy()


if __name__ == "__main__":
    main()
