"""The run config of pretrain_mt.py: nested component sections (`data.batching`, `eval.search`), the former flat
keys of those sections still loading (with a warning naming both keys), and the in-repo configs in the nested form."""

import logging
from pathlib import Path

import pytest
import yaml

from megatron_taskmoe.config_io import ConfigError, dump_yaml, load_config, same_config
from megatron_taskmoe.data.batching import BatchingConfig
from megatron_taskmoe.generation import SearchConfig
from megatron_taskmoe.training.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [*sorted((ROOT / "examples/configs").glob("*.yaml")), ROOT / "tests/learning/learnability.yaml"]

FLAT = """\
data:
  data_dir: corpus
  max_tokens: 1536
  pad_to_multiple: 16
  task_homogeneous: true
eval:
  interval: 50
  beam_size: 4
  length_penalty: 0.6
  max_len_a: 1.5
  max_len_b: 20
"""

NESTED = """\
data:
  data_dir: corpus
  batching:
    max_tokens: 1536
    pad_to_multiple: 16
    task_homogeneous: true
eval:
  interval: 50
  search:
    beam_size: 4
    length_penalty: 0.6
    max_len_a: 1.5
    max_len_b: 20
"""


def test_defaults_of_the_nested_sections():
    cfg = RunConfig()
    assert cfg.data.batching == BatchingConfig(max_tokens=2048, pad_to_multiple=8, task_homogeneous=False)
    assert cfg.eval.search == SearchConfig(beam_size=1, length_penalty=1.0, max_len_a=1.2, max_len_b=10)


def test_flat_keys_load_as_the_nested_sections(tmp_path, caplog):
    (tmp_path / "flat.yaml").write_text(FLAT)
    (tmp_path / "nested.yaml").write_text(NESTED)
    with caplog.at_level(logging.WARNING, logger="megatron_taskmoe.config_io"):
        nested = load_config(RunConfig, tmp_path / "nested.yaml")
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="megatron_taskmoe.config_io"):
        flat = load_config(RunConfig, tmp_path / "flat.yaml")
    assert flat == nested
    assert nested.data.batching == BatchingConfig(max_tokens=1536, pad_to_multiple=16, task_homogeneous=True)
    assert nested.eval.search == SearchConfig(beam_size=4, length_penalty=0.6, max_len_a=1.5, max_len_b=20)
    for old, new in [("data.max_tokens", "data.batching.max_tokens"),
                     ("data.pad_to_multiple", "data.batching.pad_to_multiple"),
                     ("data.task_homogeneous", "data.batching.task_homogeneous"),
                     ("eval.beam_size", "eval.search.beam_size"),
                     ("eval.length_penalty", "eval.search.length_penalty"),
                     ("eval.max_len_a", "eval.search.max_len_a"), ("eval.max_len_b", "eval.search.max_len_b")]:
        assert f"config key {old} is now {new}" in caplog.text
    # the resolved config a run writes is in the nested form and reads back the same, without warnings
    dump_yaml(flat, tmp_path / "resolved.yaml")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_taskmoe.config_io"):
        assert load_config(RunConfig, tmp_path / "resolved.yaml") == nested
    assert caplog.text == ""


def test_overrides_take_nested_and_flat_keys(tmp_path, caplog):
    (tmp_path / "nested.yaml").write_text(NESTED)
    (tmp_path / "flat.yaml").write_text(FLAT)
    for path in ("nested.yaml", "flat.yaml"):
        cfg = load_config(RunConfig, tmp_path / path, ["eval.search.beam_size=2", "data.batching.max_tokens=512"])
        assert cfg.eval.search.beam_size == 2 and cfg.data.batching.max_tokens == 512
        with caplog.at_level(logging.WARNING, logger="megatron_taskmoe.config_io"):
            cfg = load_config(RunConfig, tmp_path / path, ["eval.beam_size=3", "data.max_tokens=256"])
        assert cfg.eval.search.beam_size == 3 and cfg.data.batching.max_tokens == 256
        assert "--set eval.beam_size: the key is now eval.search.beam_size" in caplog.text
    with pytest.raises(ConfigError, match=r"eval\.search: beam_size must be >= 1"):
        load_config(RunConfig, None, ["eval.search.beam_size=0"])
    with pytest.raises(ConfigError, match=r"data\.batching\.max_tokens must be >= 8"):
        load_config(RunConfig, None, ["data.max_tokens=4"])


@pytest.mark.parametrize("section, old, new", [("data", "max_tokens: 512", "batching:\n    max_tokens: 1024"),
                                               ("eval", "beam_size: 2", "search:\n    beam_size: 4")])
def test_a_key_given_both_ways_is_an_error_naming_both(tmp_path, section, old, new):
    path = tmp_path / "both.yaml"
    path.write_text(f"{section}:\n  {old}\n  {new}\n")
    key = old.split(":")[0]
    inner = new.split(":")[0]
    with pytest.raises(ConfigError, match=rf"both\.yaml: {section}\.{key} and {section}\.{inner}\.{key} are the same "
                                          "setting, given twice"):
        load_config(RunConfig, path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_repository_configs_use_the_nested_form(path, caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_taskmoe.config_io"):
        load_config(RunConfig, path)
    assert caplog.text == "", f"{path} uses former keys"


def test_same_config_reads_a_saved_flat_config_as_its_nested_form():
    """What benchmarks/paper_tables.py and serving.py compare to skip a run already trained."""
    flat, nested = yaml.safe_load(FLAT), yaml.safe_load(NESTED)
    assert same_config(RunConfig, flat, nested) and same_config(RunConfig, nested, nested)
    nested["eval"]["search"]["beam_size"] = 5
    assert not same_config(RunConfig, flat, nested)
