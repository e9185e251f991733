"""Decoding speed: incremental decoding against the full recompute and against a plain PyTorch peer, in one run.

    python benchmarks/decode.py [--sizes demo paper_width] [--systems dense moe_task_shared_dynamic]
                                [--beams 1 4] [--batches 1 32] [--sentences 32] [--tokens 64]

For each model size and system, the same fixed test set (`--sentences` random source sentences of 10-40 tokens,
seeded, tasks cycling) is translated at each beam size and batch size by three paths, all driven by the same
vectorised `generation.beam_search` with every output forced to exactly `--tokens` tokens (minimum = maximum
length), so that every path does the same number of steps on the same shapes:

* incremental: ours (`model/decoding.py`): key/value caches in the megatron model, last-position logits;
* recompute: the same model re-running the decoder on every whole prefix and computing logits for every position
  (`EncoderDecoderModel.decode_step`, the full-recompute reference) through the same search; it must produce the
  same tokens, which is checked;
* peer: a plain PyTorch Transformer of the same sizes (dense FFN, pre-norm, scaled token embeddings, learned
  positions, tied output projection) decoding incrementally in the usual way: `nn.TransformerEncoder`, then decoder
  layers with a concatenated self-attention key/value cache gathered on every beam reorder and cross-attention
  keys/values projected once per batch.

It prints source sentences/s and target tokens/s per path, the speed-up over the recompute (goal >= 5x at 64
target tokens) and our time over the peer's (goal <= 1.3; for MoE systems the peer is the dense model of the same
sizes, so the ratio includes the experts' and adapters' extra work). Each batch is translated `--repeats` times by
each path (the recompute: `--recompute-repeats`), the paths taking turns batch by batch so that machine noise hits
every path alike; a path's time is the sum over the batches of its best time on each. Sizes: `demo` is
examples/configs/demo_bible.yaml's model (d 128, FFN 256, 4 heads, 2+2 layers, 4 experts, vocabulary 4000);
`paper_width` the paper's layer width (d 1024, FFN 4096, 16 heads, 8 experts, vocabulary 32000) with 2+2 layers.
Weights are random (speed does not depend on them). CPU fp32, or the GPU in bf16 when there is one.

Legend: B batch, S source length, N hypothesis rows, H heads, Dh head dim, D model dim, V vocabulary.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore")
logging.getLogger("megatron").setLevel(logging.ERROR)

from megatron_taskmoe import compat  # noqa: E402
from megatron_taskmoe.generation import PrefixDecoder, SearchConfig, beam_search  # noqa: E402
from megatron_taskmoe.model import presets  # noqa: E402
from megatron_taskmoe.model.decoding import ModelDecoder, encode_batch  # noqa: E402
from megatron_taskmoe.model.encdec import EncoderDecoderModel  # noqa: E402
from megatron_taskmoe.parallel import groups  # noqa: E402

BOS, EOS, PAD, UNK = 2, 3, 0, 1
SIZES = {
    "demo": dict(vocab_size=4000, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, encoder_layers=2,
                 decoder_layers=2, experts=4),
    "paper_width": dict(vocab_size=32000, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
                        encoder_layers=2, decoder_layers=2, experts=8),
}
NUM_TASKS = 6


# ------------------------------------------------------------------------------------------------ the peer
class PeerDecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention with a key/value cache, cross-attention, relu FFN."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.self_out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.cross_q, self.cross_kv = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.cross_out = nn.Linear(d, d, bias=False)
        self.fc1, self.fc2 = nn.Linear(d, ffn, bias=False), nn.Linear(ffn, d, bias=False)

    def heads_of(self, x_NTD: torch.Tensor) -> torch.Tensor:
        n, t, _ = x_NTD.shape
        return x_NTD.view(n, t, self.heads, self.head_dim).transpose(1, 2)

    def memory(self, memory_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cross_kv(memory_BSD).chunk(2, dim=-1)
        return self.heads_of(k), self.heads_of(v)

    def step(self, x_N1D: torch.Tensor, cache: dict, cross: tuple, allowed_N11S: torch.Tensor) -> torch.Tensor:
        n, _, d = x_N1D.shape
        q, k, v = (self.heads_of(t) for t in self.qkv(self.norm1(x_N1D)).chunk(3, dim=-1))
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        x_N1D = x_N1D + self.self_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, 1, d))
        q = self.heads_of(self.cross_q(self.norm2(x_N1D)))
        ctx = F.scaled_dot_product_attention(q, cross[0], cross[1], attn_mask=allowed_N11S)
        x_N1D = x_N1D + self.cross_out(ctx.transpose(1, 2).reshape(n, 1, d))
        return x_N1D + self.fc2(F.relu(self.fc1(self.norm3(x_N1D))))


class PeerModel(nn.Module):
    """A plain PyTorch encoder-decoder of the benchmark's sizes (random weights)."""

    def __init__(self, *, vocab_size: int, hidden_size: int, ffn_hidden_size: int, num_attention_heads: int,
                 encoder_layers: int, decoder_layers: int, max_positions: int, **_):
        super().__init__()
        d = hidden_size
        self.embed, self.positions = nn.Embedding(vocab_size, d), nn.Embedding(max_positions, d)
        nn.init.normal_(self.embed.weight, std=d ** -0.5)
        self.scale = math.sqrt(d)  # token embeddings scaled as fairseq's (and ours by default)
        layer = nn.TransformerEncoderLayer(d, num_attention_heads, ffn_hidden_size, dropout=0.0, batch_first=True,
                                           norm_first=True, bias=False)
        self.encoder = nn.TransformerEncoder(layer, encoder_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.layers = nn.ModuleList(PeerDecoderLayer(d, num_attention_heads, ffn_hidden_size)
                                    for _ in range(decoder_layers))
        self.final_norm = nn.LayerNorm(d)

    def encode(self, src_BS: torch.Tensor, padding_BS: torch.Tensor) -> torch.Tensor:
        x = self.embed(src_BS) * self.scale + self.positions(torch.arange(src_BS.shape[1], device=src_BS.device))
        return self.encoder(x, src_key_padding_mask=padding_BS)


class PeerDecoder:
    """`generation.IncrementalDecoder` over the peer: per layer a self-attention cache (concatenated, gathered on
    reorders) and the encoder keys/values, projected once and expanded to the rows of their sentence."""

    def __init__(self, model: PeerModel, memory_BSD: torch.Tensor, padding_BS: torch.Tensor, beam: int):
        self.model, self.beam, self.length = model, beam, 0
        self.caches = [{} for _ in model.layers]
        self.cross = [tuple(t.repeat_interleave(beam, dim=0) for t in layer.memory(memory_BSD))
                      for layer in model.layers]
        self.allowed_N11S = (~padding_BS).repeat_interleave(beam, dim=0)[:, None, None, :]

    def step(self, tokens_N: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = (m.embed(tokens_N) * m.scale + m.positions.weight[self.length]).unsqueeze(1)
        for layer, cache, cross in zip(m.layers, self.caches, self.cross):
            x = layer.step(x, cache, cross, self.allowed_N11S)
        self.length += 1
        return torch.log_softmax(F.linear(m.final_norm(x[:, 0]), m.embed.weight).float(), dim=-1)

    def reorder(self, parent_N: torch.Tensor, sentences_L: Optional[torch.Tensor] = None) -> None:
        for cache in self.caches:
            cache["k"], cache["v"] = cache["k"].index_select(0, parent_N), cache["v"].index_select(0, parent_N)
        if sentences_L is not None:  # rows of finished sentences leave the encoder keys/values too
            rows = (sentences_L.unsqueeze(1) * self.beam + torch.arange(self.beam, device=parent_N.device)).view(-1)
            self.cross = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross]
            self.allowed_N11S = self.allowed_N11S.index_select(0, rows)


# ------------------------------------------------------------------------------------------------ runs
def device_is_cuda() -> bool:
    return torch.cuda.is_available()


def build_ours(size: str, system: str, max_positions: int, device, dtype):
    s = dict(SIZES[size])
    experts = s.pop("experts")
    base = presets.tiny(vocab_pad_multiple=128, max_source_positions=max_positions,
                        max_target_positions=max_positions, **s)
    cfg = presets.SYSTEMS[system](base)
    if cfg.moe is not None:
        cfg = replace(cfg, moe=replace(cfg.moe, num_experts=experts, num_tasks=NUM_TASKS, num_languages=NUM_TASKS))
    groups.model_parallel_manual_seed(0)
    return EncoderDecoderModel(cfg).to(device=device, dtype=dtype).eval(), cfg


def test_set(n: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(10, 41, (n,), generator=g).tolist()
    return [{"src": torch.randint(4, vocab, (s,), generator=g), "task": i % NUM_TASKS} for i, s in enumerate(lengths)]


def batches(sentences: list[dict], size: int, device) -> list[dict]:
    out = []
    for start in range(0, len(sentences), size):
        chunk = sentences[start : start + size]
        S = max(len(x["src"]) for x in chunk)
        src = torch.full((len(chunk), S), PAD, dtype=torch.long)
        for i, x in enumerate(chunk):
            src[i, : len(x["src"])] = x["src"]
        tasks = torch.tensor([x["task"] for x in chunk])
        batch = dict(src_tokens=src, src_padding_mask=src == PAD, task_ids=tasks, src_lang_ids=tasks % NUM_TASKS,
                     tgt_lang_ids=(tasks + 1) % NUM_TASKS)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def search_kwargs(batch: dict, search: SearchConfig, device) -> dict:
    rows = batch["src_tokens"].shape[0]
    return dict(batch_size=rows, bos=BOS, eos=EOS, max_lengths=[search.max_len_b] * rows, beam_size=search.beam_size,
                length_penalty=search.length_penalty, min_length=search.min_len, banned=[PAD, BOS, UNK],
                device=device)


def run_ours(model, batch, search, device, incremental: bool) -> list[list[int]]:
    state = encode_batch(model, batch, device)
    if incremental:
        decoder = ModelDecoder(model, state, beam_size=search.beam_size, max_length=search.max_len_b + 1)
    else:
        decoder = PrefixDecoder(model.step_fn(state), batch_size=batch["src_tokens"].shape[0],
                                beam_size=search.beam_size, device=device)
    return beam_search(decoder, **search_kwargs(batch, search, device))


def run_peer(peer: PeerModel, batch, search, device) -> list[list[int]]:
    memory = peer.encode(batch["src_tokens"], batch["src_padding_mask"])
    decoder = PeerDecoder(peer, memory, batch["src_padding_mask"], search.beam_size)
    return beam_search(decoder, **search_kwargs(batch, search, device))


def timed(fn, batch, clock) -> tuple[float, list]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = clock()
    out = fn(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clock() - start, out


def interleaved(paths: dict, data: list, repeats: dict, clock) -> tuple[dict, dict]:
    """Each path's summed best time over the batches and its outputs (first repeat). `paths[name]` is (translate
    one batch, how many of the first batches that path runs); the paths take turns on every batch, `repeats[name]`
    times each (0: the path is skipped)."""
    total = {name: 0.0 for name in paths}
    outs = {name: [] for name in paths}
    for i, batch in enumerate(data):
        best = {}
        for r in range(max(repeats.values())):
            for name, (fn, limit) in paths.items():
                if r < repeats[name] and i < limit:
                    t, out = timed(fn, batch, clock)
                    best[name] = min(best.get(name, math.inf), t)
                    if r == 0:
                        outs[name].extend(out)
        for name, t in best.items():
            total[name] += t
    return total, outs


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["demo", "paper_width"])
    parser.add_argument("--systems", nargs="+", choices=sorted(presets.SYSTEMS),
                        default=["dense", "moe_task_shared_dynamic"])
    parser.add_argument("--beams", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--sentences", type=int, default=32, help="size of the fixed test set")
    parser.add_argument("--recompute-sentences", type=int, default=0,
                        help="translate only the first N sentences (at least one batch) with the recompute, whose "
                             "rate is per sentence: it is the slow path (0: all)")
    parser.add_argument("--tokens", type=int, default=64, help="target tokens per output")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recompute-repeats", type=int, default=1, help="0 skips the recompute")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (with --threads 1, robust to other jobs on the machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and device_is_cuda():
        parser.error("--clock cpu measures CPU time; on a GPU use the wall clock")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    compat.apply()
    groups.init_distributed(rank=0, world_size=1, master_port=groups.free_port())
    groups.initialize_model_parallel()
    device = groups.device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    max_positions = args.tokens + 2
    search_of = {beam: SearchConfig(beam_size=beam, max_len_a=0.0, max_len_b=args.tokens, min_len=args.tokens)
                 for beam in args.beams}
    print(f"device {device} ({dtype}), {torch.get_num_threads()} threads, {args.clock} clock, load "
          f"{os.getloadavg()[0]:.1f}; "
          f"{args.sentences} sentences of 10-40 source tokens, {args.tokens} target tokens each")
    header = (f"{'size':12s} {'system':24s} {'beam':>4s} {'batch':>5s} | {'ours sent/s':>11s} {'tok/s':>9s} | "
              f"{'recompute':>9s} {'tok/s':>9s} | {'peer sent/s':>11s} {'tok/s':>9s} | {'speed-up':>8s} "
              f"{'ours/peer time':>14s} same")
    print(header)
    for size in args.sizes:
        sentences = test_set(args.sentences, SIZES[size]["vocab_size"])
        torch.manual_seed(0)
        peer = PeerModel(max_positions=max_positions, **SIZES[size]).to(device=device, dtype=dtype).eval()
        for system in args.systems:
            model, _ = build_ours(size, system, max_positions, device, dtype)
            for beam in args.beams:
                search = search_of[beam]
                for bsz in args.batches:
                    data = batches(sentences, bsz, device)
                    n_rec = min(args.sentences, max(args.recompute_sentences, bsz)) if args.recompute_sentences \
                        else args.sentences
                    rec_data = batches(sentences[:n_rec], bsz, device)
                    run_ours(model, data[0], search, device, True)  # warm-up
                    run_peer(peer, data[0], search, device)
                    paths = {"ours": (lambda b: run_ours(model, b, search, device, True), len(data)),
                             "peer": (lambda b: run_peer(peer, b, search, device), len(data)),
                             "recompute": (lambda b: run_ours(model, b, search, device, False), len(rec_data))}
                    best, outs = interleaved(paths, data, {"ours": args.repeats, "peer": args.repeats,
                                                           "recompute": args.recompute_repeats}, clock)
                    sent = {"ours": args.sentences / best["ours"], "peer": args.sentences / best["peer"]}
                    if args.recompute_repeats:
                        sent["recompute"] = n_rec / best["recompute"]
                    else:
                        outs.pop("recompute")
                    if "recompute" in outs:
                        recompute = (f"{sent['recompute']:9.2f} {sent['recompute'] * args.tokens:9.0f}",
                                     f"{sent['ours'] / sent['recompute']:7.1f}x",
                                     "yes" if outs["ours"][:n_rec] == outs["recompute"] else "NO")
                    else:
                        recompute = (f"{'-':>9s} {'-':>9s}", f"{'-':>8s}", "-")
                    print(f"{size:12s} {system:24s} {beam:4d} {bsz:5d} | {sent['ours']:11.2f} "
                          f"{sent['ours'] * args.tokens:9.0f} | {recompute[0]} | {sent['peer']:11.2f} "
                          f"{sent['peer'] * args.tokens:9.0f} | {recompute[1]} {sent['peer'] / sent['ours']:14.2f} "
                          f"{recompute[2]}", flush=True)
            del model
    groups.destroy()


if __name__ == "__main__":
    main()
