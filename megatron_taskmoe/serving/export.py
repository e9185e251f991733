"""`tools/checkpoint/export_ctranslate2.py` as a library call: pick the directions, check the model can be a dense
Transformer for them, convert, optionally verify, and only then let the output directory appear.

Order of work (everything that can be refused is refused before anything is written): the source is read
(`serving/source.py`), the directions chosen (`--task` / `--target-lang`, as extract_task.py chooses them; all
directions by default), the dense network planned (`serving/dense.py` refuses what cannot be expressed), then
CTranslate2's converter writes into a `.partial.` sibling. With verification and a quantized output, a float32 copy
is converted into a temporary directory beside it for the exact check and removed afterwards; the quantized model's
agreement is recorded. The verification result is added to `taskmoe_serving.json` before the rename.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from megatron_taskmoe.checkpoint_tools.extract import select
from megatron_taskmoe.checkpoint_tools.full import CheckpointToolError
from megatron_taskmoe.checkpoint_tools.outputs import atomic_dir, check_output
from megatron_taskmoe.serving.ctranslate2_export import QUANTIZATIONS, SERVING_FILE, write_model
from megatron_taskmoe.serving.ctranslate2_translator import bitext_test_sets, synthetic_test_sets, verify
from megatron_taskmoe.serving.dense import densify
from megatron_taskmoe.serving.source import ReferenceSource, read_source

log = logging.getLogger(__name__)


class ExportVerificationError(RuntimeError):
    """CTranslate2's outputs differ from the reference model's (nothing was written)."""


def served_directions(source: ReferenceSource, tasks: Sequence[str] = (), target_langs: Sequence[str] = ()
                      ) -> list[str]:
    """The directions to serve: those named (a task, a direction or a target language), all by default."""
    config = source.config
    if not tasks and not target_langs:
        return sorted(config.task_map.get("direction_to_task", {}))
    meta = {"task_map": config.task_map, "languages": config.languages}
    return sorted(select(meta, tasks=tasks, target_langs=target_langs, where=source.where).directions)


def export_source(source: ReferenceSource, output: str | os.PathLike, *, tasks: Sequence[str] = (),
                  target_langs: Sequence[str] = (), quantization: str = "float32", overwrite: bool = False,
                  verify: bool = False, verify_data: Optional[Path] = None, verify_split: str = "test",
                  verify_sentences: int = 32, tolerance: float = 1e-3) -> dict:
    """Write the CTranslate2 directory serving the chosen directions of `source`; see the module docstring.
    Returns a summary (directions, parameters, gates, verification)."""
    if quantization not in QUANTIZATIONS:
        raise CheckpointToolError(f"--quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    output = check_output(output, overwrite)
    directions = served_directions(source, tasks, target_langs)
    dense = densify(source.config, source.state, directions, source.where)  # refuses before anything is written
    tests = None
    if verify:
        tests = (bitext_test_sets(source, directions, verify_data, verify_split, verify_sentences)
                 if verify_data is not None else synthetic_test_sets(source, directions, sentences=verify_sentences))
    summary = {"output": str(output), "directions": directions, "quantization": quantization,
               "parameters": {"source": sum(t.numel() for t in source.state.values()),
                              "served": dense.num_parameters()},
               "gates": {g.layer: {"experts": g.experts, "weights": [round(w, 6) for w in g.weights]}
                         for g in dense.gates}}
    with atomic_dir(output, overwrite) as partial:
        record = write_model(source, directions, partial, quantization=quantization)
        if verify:
            if quantization == "float32":
                result = verify_model(source, partial, tests, tolerance, None)
            else:
                with tempfile.TemporaryDirectory(prefix=f".{output.name}.float32.", dir=output.parent) as tmp:
                    write_model(source, directions, Path(tmp), quantization="float32")
                    result = verify_model(source, Path(tmp), tests, tolerance, partial)
            summary["verify"] = result
            record["verify"] = result
            (partial / SERVING_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n",
                                                encoding="utf-8")
            if not result["float32"]["passed"]:
                fp32 = result["float32"]
                raise ExportVerificationError(
                    f"{output}: CTranslate2 does not reproduce {source.where}: {fp32['greedy_different']} of "
                    f"{fp32['sentences']} greedy outputs differ (beyond ties), token log-probabilities differ by up "
                    f"to {fp32['max_abs_token_logprob_difference']:.3g} (tolerance {tolerance:g}); e.g. "
                    f"{fp32['examples'][:1]} (nothing written)")
    log.info("exported %s (%s) -> %s: %d of %d parameters served, %s", source.where, ", ".join(directions), output,
             summary["parameters"]["served"], summary["parameters"]["source"], quantization)
    return summary


def verify_model(source: ReferenceSource, fp32_dir: Path, tests, tolerance: float,
                 quantized_dir: Optional[Path]) -> dict:
    result = verify(source, fp32_dir, tests, tolerance=tolerance, quantized_dir=quantized_dir)
    fp32 = result["float32"]
    log.info("verify: %d/%d greedy outputs identical (%d ties), token log-probabilities within %.2g",
             fp32["greedy_identical"], fp32["sentences"], fp32["greedy_ties"],
             fp32["max_abs_token_logprob_difference"])
    return result


def export_ctranslate2(source: str | os.PathLike, output: str | os.PathLike, **kwargs) -> dict:
    """`export_source` of an export directory, a trainer checkpoint or a convert.py .safetensors file."""
    check_output(output, kwargs.get("overwrite", False))
    return export_source(read_source(source), output, **kwargs)


__all__ = ["ExportVerificationError", "served_directions", "export_source", "export_ctranslate2"]
