"""The megatron side of `test_export.py`, run as ONE subprocess (the pytest process creates no process group).

    python -m tests.helpers.export_helper JOB.json  -> prints one JSON object (from the repository root)

JOB.json keys (all optional):
  * "exports": [[checkpoint, output_dir(, dtype)], ...]: `export_checkpoint` + `verify_export` of each;
  * "matrix": {"tokenizer": spm.model, "languages": [...], "tasks": [...], "out_dir": dir}: every routing mode,
    capacity / drop policy / padding, top-1 and raw top-2, each adapter mode, activation, norm, bias and per-side
    expert counts, on randomly initialised (and perturbed, so norms and biases matter) models, exported and
    verified; the summaries by name;
  * "failed_verify": [checkpoint, output_dir]: an export whose verification reports a difference (patched in);
    the error and whatever is left beside the output;
  * "translate": {"checkpoint", "sentences", "src", "tgt", "beams": [1, 4]}: `inference.Translator` outputs.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

warnings.filterwarnings("ignore")


def matrix_configs(vocab: int, tasks: int, languages: int) -> dict:
    from megatron_taskmoe.model import presets
    from megatron_taskmoe.model.moe_config import RoutingConfig

    def get(system, **kw):
        return presets.get(system, "tiny", num_tasks=tasks, num_languages=languages, vocab_size=vocab,
                           max_source_positions=24, max_target_positions=24, **kw)

    def moe(cfg, **kw):
        return replace(cfg, moe=replace(cfg.moe, **kw))

    def side(cfg, name, **kw):
        return moe(cfg, **{name: replace(getattr(cfg.moe, name), **kw)})

    shared = get("moe_task_shared_dynamic")
    by_lang = dict(task_source="target_language")
    out = {
        "dense_gelu_bias_rmsnorm": get("dense", activation="gelu", bias=True, normalization="RMSNorm"),
        "token_top1_swiglu_every_layer": side(side(moe(get("moe_token", activation="swiglu"), topk=1), "encoder",
                                                   layer_freq=1), "decoder", layer_freq=1),
        "sentence_capacity_position_padded": moe(get("moe_sentence"), capacity_factor=1.0, drop_policy="position",
                                                 pad_to_capacity=True),
        "static_capacity_probs_raw_top2": moe(get("moe_task_static"), capacity_factor=0.5, renormalize_topk=False),
        "dynamic_top2_adapters_router_in_input_dtype": moe(
            get("moe_task_dynamic"), router_dtype="input",
            adapters=replace(get("moe_task_dynamic").moe.adapters, topk=2, num_adapters=3)),
        "task_enc_tasktoken_dec_shared_by_target": moe(
            shared, encoder=replace(shared.moe.encoder, mode="task", **by_lang),
            decoder=replace(shared.moe.decoder, **by_lang), adapters=replace(shared.moe.adapters, **by_lang)),
        "token_enc_task_dec": get("token_enc_task_dec"),
    }
    if "num_experts" in RoutingConfig.__dataclass_fields__:  # per-side expert counts (task sub-networks)
        out["per_side_experts"] = side(get("token_enc_task_dec"), "decoder", num_experts=2)
    if "capacity_num_experts" in RoutingConfig.__dataclass_fields__:  # an extracted sub-network with dropping
        out["per_side_experts_capacity"] = side(moe(get("token_enc_task_dec"), capacity_factor=1.0), "decoder",
                                                num_experts=2, capacity_num_experts=4)
    if "dense_task_static" in presets.SYSTEMS:  # one expert, top-1: MoE layers as plain FFNs with adapters
        out["one_expert_static_adapters"] = get("dense_task_static")
    return out


def random_checkpoint(cfg, meta: dict, tokenizer: bytes, seed: int):
    import torch

    from megatron_taskmoe.checkpoint.process_groups import one_process_groups
    from megatron_taskmoe.checkpoint_tools.full import FullCheckpoint
    from megatron_taskmoe.config_io import to_dict
    from megatron_taskmoe.model.config import ParallelConfig, to_transformer_config
    from megatron_taskmoe.model.encdec import EncoderDecoderModel
    from megatron_taskmoe.parallel import groups

    pg = one_process_groups()
    groups.model_parallel_manual_seed(seed)
    model = EncoderDecoderModel(cfg, ParallelConfig(), pg_collection=pg,
                                transformer_config=to_transformer_config(cfg, ParallelConfig()))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v + 0.05 * torch.randn(v.shape, generator=g)  # norms and biases away from their 1/0 init
        if isinstance(v, torch.Tensor):
            state[k] = v.clone()
    return FullCheckpoint(state=state, meta={**meta, "model_config": to_dict(cfg)}, tokenizer=tokenizer,
                          source=f"random:{seed}")


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    result: dict = {}
    from megatron_taskmoe import compat
    from megatron_taskmoe.checkpoint_tools.export import export_checkpoint, verify_export
    from megatron_taskmoe.checkpoint_tools.reading import read_checkpoint

    compat.apply()

    def export_and_verify(ckpt, out, dtype="fp32"):
        """The export's summary and the verification figures (reported, not judged: the test judges)."""
        return {**export_checkpoint(ckpt, out, dtype=dtype), **verify_export(ckpt, out, dtype=dtype)}

    for ckpt, out, *dtype in job.get("exports", []):
        result.setdefault("exports", {})[out] = export_and_verify(read_checkpoint(ckpt), out, *dtype)
    if "failed_verify" in job:
        # A verification that finds a difference must raise and leave neither the output nor its .partial sibling.
        from megatron_taskmoe.checkpoint_tools import export as export_module

        ckpt, out = job["failed_verify"]
        real = export_module.verify_export
        export_module.verify_export = lambda *a, **k: {**real(*a, **k), "beam_identical": False}
        try:
            export_module.export_checkpoint(read_checkpoint(ckpt), out, verify=True)
            error = None
        except export_module.ExportVerificationError as e:
            error = str(e)
        finally:
            export_module.verify_export = real
        out = Path(out)
        result["failed_verify"] = {"error": error, "left": sorted(p.name for p in out.parent.iterdir()
                                                                  if p.name.endswith(out.name))}
    if "matrix" in job:
        m = job["matrix"]
        tokenizer = Path(m["tokenizer"]).read_bytes()
        import sentencepiece as spm

        vocab = spm.SentencePieceProcessor(model_file=m["tokenizer"]).get_piece_size()
        meta = {"languages": m["languages"], "task_map": {"mode": "direction", "tasks": m["tasks"],
                                                          "direction_to_task": {t: i for i, t in
                                                                                enumerate(m["tasks"])}}}
        configs = matrix_configs(vocab, len(m["tasks"]), len(m["languages"]))
        for i, (name, cfg) in enumerate(configs.items()):
            ckpt = random_checkpoint(cfg, meta, tokenizer, seed=i)
            result.setdefault("matrix", {})[name] = export_and_verify(ckpt, Path(m["out_dir"]) / name)
    if "translate" in job:
        from megatron_taskmoe.inference import Translator, TranslatorConfig, load_checkpoint

        t = job["translate"]
        loaded = load_checkpoint(t["checkpoint"], device="cpu")
        for beam in t["beams"]:
            tr = Translator(loaded, TranslatorConfig(beam_size=beam, batch_size=t.get("batch_size", 32)))
            result.setdefault("translate", {})[str(beam)] = {
                "ids": tr.translate_ids(t["sentences"], t["src"], t["tgt"]),
                "text": tr.translate(t["sentences"], t["src"], t["tgt"])}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
