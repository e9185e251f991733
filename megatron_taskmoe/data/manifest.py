"""`OUT/manifest.json`: what a preprocessed data directory holds, and the direction -> task id mapping.

Task ids are fixed when the data is preprocessed and stored here (and by the trainer in its checkpoints), so that
adding data or reordering options never shifts them. Language ids are indexes into the sorted `languages` list.

Task-map modes:
  * `direction` (default): one task per direction (de-en, en-de, ...), the paper's setting;
  * `pair`: one task per unordered language pair (de-en and en-de share one);
  * `target`: one task per target language (all X->de share one);
  * `source`: one task per source language;
  * explicit groups from a JSON or YAML file: `{"groups": {"xx-en": ["de-en", "fr-en"], "en-xx": [...]}}`
    (task ids in the file's order; every direction must be in exactly one group).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

from megatron_taskmoe.data.bitext import DataError
from megatron_taskmoe.data.indexed import check_indexed_dataset

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
TASK_MAP_MODES = ("direction", "pair", "target", "source")


def _task_key(direction: str, mode: str) -> str:
    src, tgt = direction.split("-")
    if mode == "direction":
        return direction
    if mode == "pair":
        return "-".join(sorted((src, tgt)))
    if mode == "target":
        return f"to-{tgt}"
    return f"from-{src}"


def load_groups_file(path: Path) -> dict[str, list[str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read task groups file: {e.strerror}") from None
    try:
        if str(path).endswith((".yaml", ".yml")):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - yaml and json raise different types; both are a user error here
        raise DataError(f"{path}: cannot parse task groups file: {e}") from None
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(d, str) for d in v) for k, v in groups.items()
    ):
        raise DataError(f'{path}: expected {{"groups": {{"task name": ["de-en", ...], ...}}}}')
    return groups


def build_task_map(directions: list[str], spec: str) -> dict:
    """{"mode", "tasks": [names in id order], "direction_to_task": {direction: id}} for a mode or a groups file."""
    directions = sorted(directions)
    if spec in TASK_MAP_MODES:
        tasks = sorted({_task_key(d, spec) for d in directions})
        index = {t: i for i, t in enumerate(tasks)}
        return {"mode": spec, "tasks": tasks, "direction_to_task": {d: index[_task_key(d, spec)] for d in directions}}
    groups = load_groups_file(Path(spec))
    mapping: dict[str, int] = {}
    for task_id, (name, members) in enumerate(groups.items()):
        for d in members:
            if d not in directions:
                raise DataError(f"{spec}: group {name!r} names direction {d!r}, which is not in the data "
                                f"(directions: {' '.join(directions)})")
            if d in mapping:
                raise DataError(f"{spec}: direction {d!r} is in more than one group")
            mapping[d] = task_id
    missing = [d for d in directions if d not in mapping]
    if missing:
        raise DataError(f"{spec}: direction(s) {' '.join(missing)} are in no group")
    return {"mode": f"groups:{Path(spec).name}", "tasks": list(groups), "direction_to_task": mapping}


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_manifest(data_dir: Path) -> dict:
    """The manifest of a preprocessed directory, checked for the fields the readers use (DataError otherwise)."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (is {data_dir} the output of tools/preprocess_data.py?)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: format_version {version!r}, expected {FORMAT_VERSION}")
    _check_fields(manifest, path)
    return manifest


# field -> type, for the fields every reader relies on; "*" stands for every key of a mapping
_SCHEMA = {
    "languages": list, "language_ids": dict, "dtype": str,
    "tokenizer": dict, "tokenizer.vocab_size": int, "tokenizer.lang_tag_ids": dict, "tokenizer.path": str,
    "tokenizer.sha256": str,
    "task_map": dict, "task_map.mode": str, "task_map.tasks": list, "task_map.direction_to_task": dict,
    "directions": dict, "directions.*": dict, "directions.*.src": str, "directions.*.tgt": str,
    "directions.*.task_id": int, "directions.*.splits": dict, "directions.*.splits.*": dict,
    "directions.*.splits.*.src_prefix": str, "directions.*.splits.*.tgt_prefix": str,
    "directions.*.splits.*.sentences": int, "directions.*.splits.*.src_tokens": int,
    "directions.*.splits.*.tgt_tokens": int,
    "filters": dict, "filters.order": list, "filters.removed": dict, "filters.removed.*": dict,
}


def _check_fields(manifest: dict, path: Path) -> None:
    for spec, kind in _SCHEMA.items():
        nodes = [("", manifest)]
        for part in spec.split("."):
            children = []
            for name, node in nodes:
                keys = list(node) if part == "*" else [part]
                for key in keys:
                    where = f"{name}.{key}" if name else key
                    if key not in node:
                        raise DataError(f"{path}: missing field {where!r} (a damaged manifest; re-run "
                                        "tools/preprocess_data.py)")
                    children.append((where, node[key]))
            nodes = children
        for where, value in nodes:
            if not isinstance(value, kind) or isinstance(value, bool):
                raise DataError(f"{path}: field {where!r} should be of type {kind.__name__}, found {value!r:.40}")


def check_data_files(data_dir: Path, manifest: dict, split: str | None = None) -> None:
    """Every .bin/.idx the manifest names (of `split`, or of all splits) exists and holds the sentences and tokens
    the manifest records (index headers and file sizes only), and so does every reference text it names (one line
    per sentence). DataError naming the file otherwise."""
    for entry in manifest["directions"].values():
        for name, info in entry["splits"].items():
            if split is None or name == split:
                check_indexed_dataset(Path(data_dir) / info["src_prefix"], sentences=info["sentences"],
                                      tokens=info["src_tokens"])
                check_indexed_dataset(Path(data_dir) / info["tgt_prefix"], sentences=info["sentences"],
                                      tokens=info["tgt_tokens"])
                if "references" in info:
                    path = Path(data_dir) / str(info["references"])
                    try:
                        lines = path.read_bytes().count(b"\n")
                    except OSError as e:
                        raise DataError(f"{path}: cannot read the reference text: {e.strerror}") from None
                    if lines != info["sentences"]:
                        raise DataError(f"{path}: {lines} lines, but manifest.json says {info['sentences']} "
                                        "sentences")


def check_task_map_compatible(saved: dict, current: dict) -> None:
    """A checkpoint's task map must agree with the data's on every shared direction (ids must never shift)."""
    for d, task in saved["direction_to_task"].items():
        now = current["direction_to_task"].get(d)
        if now is not None and now != task:
            raise DataError(f"task id of {d} is {now} in the data but {task} in the checkpoint: the task map changed "
                            "(re-run preprocessing with the checkpoint's --task-map)")
