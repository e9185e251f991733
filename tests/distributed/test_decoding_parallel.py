"""Incremental decoding under tensor parallelism (with sequence parallelism: a one-token step padded to TP positions)
and pipelined (each decoder stage keeps its own layers' key/value cache) gives the single-process translations,
token for token, greedy and beam; under tensor parallelism the next-token log-probabilities of every step too.

The single-process model (whose incremental decoding equals its full recompute: tests/unit/test_incremental_decoding
.py) decodes in this process; the layouts load its weights in gloo processes (`tests/helpers/harness.py`) and decode the same
batch. The eos logit is enlarged so that hypotheses end at different steps (beam reorders, sentences leaving the
batch) instead of all running to their maximum length.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_taskmoe.generation import SearchConfig, beam_search
from megatron_taskmoe.model import presets
from megatron_taskmoe.model.config import ParallelConfig, to_transformer_config
from megatron_taskmoe.model.decoding import ModelDecoder, encode_batch
from megatron_taskmoe.parallel import groups

from tests.helpers import harness as H

pytestmark = pytest.mark.distributed

BOS, EOS = 2, 3
BANNED = [0, 1, BOS]
SEARCHES = {"greedy": SearchConfig(beam_size=1, max_len_a=1.0, max_len_b=3),
            "beam3": SearchConfig(beam_size=3, max_len_a=1.0, max_len_b=3, min_len=2)}


def model_config(system: str):
    cfg = presets.get(system, "tiny", num_tasks=3, num_languages=4)
    if cfg.moe is not None:
        cfg = replace(cfg, moe=replace(cfg.moe, encoder=replace(cfg.moe.encoder, layer_freq=1),
                                       decoder=replace(cfg.moe.decoder, layer_freq=1)))
    return cfg


def decode(model, batch, search):
    """Translations and the log-probabilities [N, V] of every step, single process or tensor parallel."""
    steps = []
    state = encode_batch(model, batch, torch.device("cpu"))
    lengths = search.max_lengths((~batch["src_padding_mask"]).sum(dim=1).tolist(), 60)
    decoder = ModelDecoder(model, state, beam_size=search.beam_size, max_length=max(lengths) + 1)
    step = decoder.step
    decoder.step = lambda tokens_N: steps.append(step(tokens_N)) or steps[-1]
    hyps = beam_search(decoder, batch_size=len(lengths), bos=BOS, eos=EOS, max_lengths=lengths,
                       beam_size=search.beam_size, min_length=search.min_len, banned=BANNED)
    return hyps, steps


def reference(systems, batch, out_dir: Path):
    """Single-process weights (eos row enlarged) and decodes, saved for the workers and the comparison."""
    groups.init_distributed(rank=0, world_size=1)
    try:
        groups.initialize_model_parallel()
        for system in systems:
            model = H.build_model(model_config(system)).eval()
            with torch.no_grad():
                model.embedding.word_embeddings.weight[EOS] *= 8
            result = {name: decode(model, batch, search) for name, search in SEARCHES.items()}
            torch.save({"state": {k: v.detach().clone() for k, v in model.named_parameters()}, "result": result},
                       out_dir / f"{system}.pt")
    finally:
        groups.destroy()


def tensor_parallel_worker(rank, world_size, systems, parallel_cfg, batch, out_dir):
    groups.initialize_model_parallel(ParallelConfig(tensor=parallel_cfg.tensor))
    for system in systems:
        ref = torch.load(Path(out_dir) / f"{system}.pt", weights_only=False)
        model = H.build_model(model_config(system), parallel_cfg).eval()
        H.load_full_state(model, ref["state"])
        for name, search in SEARCHES.items():
            hyps, steps = decode(model, batch, search)
            want_hyps, want_steps = ref["result"][name]
            assert hyps == want_hyps, (rank, system, name)
            assert len(steps) == len(want_steps)
            for got, want in zip(steps, want_steps):
                finite = torch.isfinite(want)
                assert torch.equal(finite, torch.isfinite(got))
                torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-4)


def pipeline_worker(rank, world_size, systems, parallel_cfg, batch, out_dir):
    from megatron_taskmoe.parallel import pipeline
    from megatron_taskmoe.parallel.pipeline_decoding import pipelined_translate_batch

    pg = groups.initialize_model_parallel(parallel_cfg)
    results = {}
    for system in systems:
        cfg = model_config(system)
        ref = torch.load(Path(out_dir) / f"{system}.pt", weights_only=False)
        groups.model_parallel_manual_seed(1234)
        tconfig = to_transformer_config(cfg, parallel_cfg, pipeline_dtype=torch.float32, variable_seq_lengths=True)
        stage = pipeline.build_stage(cfg, parallel_cfg, pg_collection=pg, transformer_config=tconfig).eval()
        H.load_full_state(stage, ref["state"])
        results[system] = {name: pipelined_translate_batch(stage, batch, search, pg.pp, bos=BOS, eos=EOS,
                                                           banned=BANNED)
                           for name, search in SEARCHES.items()}
    (Path(out_dir) / f"pipelined_rank{rank}.json").write_text(json.dumps(results))


CASES = {
    # name: (worker, parallel config, world size, systems): token routing, task-aware routing with shared-dynamic
    # adapters, decoder routing by the source sentence (a per-hypothesis state reduced over sequence shards), dense
    "tp2_sp": (tensor_parallel_worker, ParallelConfig(tensor=2), 2, ("moe_task_shared_dynamic", "moe_sentence",
                                                                      "dense")),
    "tp2_dense_no_sp": (tensor_parallel_worker, ParallelConfig(tensor=2, sequence_parallel=False), 2, ("dense",)),
    "pp2": (pipeline_worker, ParallelConfig(pipeline=2, encoder_pipeline_stages=1), 2, ("moe_token", "moe_sentence")),
    "pp4": (pipeline_worker, ParallelConfig(pipeline=4, encoder_pipeline_stages=2), 4, ("moe_token",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_decoding_equals_single_process(tmp_path, case):
    worker, parallel_cfg, world, systems = CASES[case]
    batch = H.make_batch(256, batch=5, src_len=9, tgt_len=4, seed=3)
    batch = {k: batch[k] for k in ("src_tokens", "src_padding_mask", "task_ids", "src_lang_ids", "tgt_lang_ids")}
    reference(systems, batch, tmp_path)
    H.spawn(worker, world, systems, parallel_cfg, batch, str(tmp_path), tmp_dir=str(tmp_path))
    lengths = set()
    for system in systems:
        want = torch.load(tmp_path / f"{system}.pt", weights_only=False)["result"]
        lengths |= {len(h) for name in SEARCHES for h in want[name][0]}
        if worker is pipeline_worker:
            for rank in range(world):  # every rank of the pipeline group gets the hypotheses
                got = json.loads((tmp_path / f"pipelined_rank{rank}.json").read_text())[system]
                assert got == {name: want[name][0] for name in SEARCHES}, (rank, system)
    assert len(lengths) > 1, lengths  # hypotheses ended at different steps
