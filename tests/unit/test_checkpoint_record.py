"""`CheckpointRecord` (checkpoint.json) round trips and reads the records the trainer and the tools have written;
the checkpoint format's readers (inference, checkpoint tools, serving) do not depend on the trainer; no import
cycles in the packages that own or use the format."""

import ast
import copy
import json
from pathlib import Path

import pytest

import megatron_taskmoe
from megatron_taskmoe.checkpoint.format import MARKER
from megatron_taskmoe.checkpoint.manager import read_info
from megatron_taskmoe.checkpoint.record import CheckpointFormatError, CheckpointRecord, read_record
from megatron_taskmoe.config_io import to_dict
from megatron_taskmoe.model.config import RECORD_DEFAULTS, ModelConfig

PACKAGE = Path(megatron_taskmoe.__file__).parent

TASK_MAP = {"mode": "direction", "tasks": ["de-en", "en-de"], "direction_to_task": {"de-en": 0, "en-de": 1}}


def _old_model_config() -> dict:
    """A model record as checkpoints wrote it before `init_method` and `scale_embedding` existed."""
    record = to_dict(ModelConfig(vocab_size=64, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
                                 encoder_layers=1, decoder_layers=1))
    for key in RECORD_DEFAULTS:
        del record[key]
    return record


# checkpoint.json as the first trainer wrote it (no optimizer_chains), byte for byte in its key order.
FIRST_TRAINER_RECORD = {
    "consumed_samples": 96, "languages": ["de", "en"], "metric": None, "model_config": _old_model_config(),
    "parallel": {"expert": 1, "expert_tensor": None, "pipeline": 1, "tensor": 1}, "step": 12,
    "task_map": TASK_MAP, "tokenizer_sha256": "ab" * 32,
}


def test_round_trip_of_a_full_record():
    record = CheckpointRecord(step=40, metric=12.5, task_map=TASK_MAP, languages=["de", "en"],
                              tokenizer_sha256="cd" * 32, model_config=_old_model_config(),
                              parallel={"tensor": 2, "pipeline": 1, "expert": 1, "expert_tensor": None},
                              consumed_samples=320, optimizer_chains=2,
                              converted_from={"path": "/runs/a", "parallel": None, "optimizer_state": "kept"},
                              extra={"written_by_a_newer_version": [1, 2]})
    again = CheckpointRecord.from_json(record.to_json())
    assert again == record
    assert json.loads(record.to_json())["written_by_a_newer_version"] == [1, 2]


def test_the_first_trainer_record_still_reads(tmp_path):
    (tmp_path / MARKER).write_text(json.dumps(FIRST_TRAINER_RECORD, indent=2, sort_keys=True))
    record = read_record(tmp_path)
    assert record.step == 12 and record.metric is None and record.optimizer_chains is None
    assert record.extra == {}
    assert record.to_dict() == FIRST_TRAINER_RECORD
    cfg = record.model()
    assert (cfg.init_method, cfg.scale_embedding) == ("normal", False)
    info = read_info(tmp_path)
    assert info.step == 12 and info.meta == FIRST_TRAINER_RECORD


@pytest.mark.parametrize("note", [
    {"converted_from": {"path": "/runs/a/checkpoints/step_00000012"}},  # convert.py from a single file
    {"converted_from": {"path": "/runs/a", "parallel": {"tensor": 1}, "optimizer_state": "reset"}},
    {"merged_from": {"a": {"path": "a", "tasks": ["de-en"], "step": 3}, "b": {"path": "b", "tasks": ["en-de"],
                     "step": 4}, "weight": 0.5, "adapters": None}},
    {"extracted": {"source": "a", "kept": {"tasks": ["de-en"]}, "layers": [], "adapters": None,
                   "parameters": {}, "step": 12}},
])
def test_records_written_by_the_tools_round_trip(note):
    written = {**copy.deepcopy(FIRST_TRAINER_RECORD), "step": 0, "optimizer_chains": 1, **note}
    record = CheckpointRecord.from_dict(written)
    assert record.extra == {}
    assert record.to_dict() == written


def test_a_record_the_merge_tool_wrote_without_metric_reads_as_unscored():
    written = {k: v for k, v in FIRST_TRAINER_RECORD.items() if k not in ("metric", "consumed_samples")}
    record = CheckpointRecord.from_dict(written)
    assert record.metric is None and record.consumed_samples is None
    assert record.to_dict() == {**written, "metric": None}


def test_a_wrong_field_type_names_the_file_and_the_field():
    with pytest.raises(CheckpointFormatError, match=r"ckpt/checkpoint.json: field 'step' is '12', expected int"):
        CheckpointRecord.from_dict({"step": "12"}, where="ckpt/checkpoint.json")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        CheckpointRecord.from_json("{", where="x")


def test_a_marker_without_step_or_unreadable_is_not_a_checkpoint(tmp_path):
    (tmp_path / MARKER).write_text(json.dumps({"languages": ["de"]}))
    assert read_record(tmp_path) is None
    (tmp_path / MARKER).write_text("{not json")
    assert read_record(tmp_path) is None


# ------------------------------------------------------------------------------------------------ import structure
def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The megatron_taskmoe modules a file imports (`from pkg import mod` counts as pkg.mod when mod is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("megatron_taskmoe")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_taskmoe"):
            out.add(node.module)
            base = PACKAGE.parent.joinpath(*node.module.split("."))
            out |= {f"{node.module}.{a.name}" for a in node.names
                    if base.joinpath(a.name).is_dir() or base.joinpath(a.name + ".py").is_file()}
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, top_level_only=top_level_only) & set(modules) for name, path in modules.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a module imports its packages
        todo.extend(graph.get(name, ()))
    return seen


# The one module of the tools that builds the trainer's stack (training.setup.build) to write trainer checkpoints
# at a layout, and the modules that write trainer checkpoints through it.
TRAINER_STACK_USERS = {"megatron_taskmoe.checkpoint_tools.layout_jobs", "megatron_taskmoe.checkpoint_tools.cli",
                       "megatron_taskmoe.checkpoint_tools.trainer_checkpoints"}


def test_format_readers_do_not_import_the_trainer():
    graph = _graph(top_level_only=False)
    readers = [m for m in graph if m == "megatron_taskmoe.inference" or m.split(".")[1:2] in
               (["checkpoint"], ["checkpoint_tools"], ["serving"])]
    assert "megatron_taskmoe.checkpoint.record" in readers and "megatron_taskmoe.serving.export" in readers
    for module in sorted(set(readers) - TRAINER_STACK_USERS):
        training = sorted(m for m in _reachable(graph, module) if m.startswith("megatron_taskmoe.training"))
        assert not training, f"{module} imports {training}"


def test_no_import_cycles_through_the_checkpoint_packages():
    graph = _graph(top_level_only=True)
    for module in graph:
        if module.split(".")[1:2] in (["checkpoint"], ["checkpoint_tools"], ["inference"]):
            others = graph[module] - {module}
            back = [m for m in others if module in _reachable(graph, m) and not module.startswith(m + ".")]
            assert not back, f"{module} and {back} import each other"
