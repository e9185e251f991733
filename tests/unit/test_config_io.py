import dataclasses
from typing import ClassVar, Literal, Optional

import pytest

from megatron_taskmoe.config_io import ConfigError, apply_overrides, dump_yaml, from_dict, load_config, to_dict


@dataclasses.dataclass(kw_only=True)
class Inner:
    """A nested section."""

    size: int = 4
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")


@dataclasses.dataclass(kw_only=True)
class Outer:
    name: str = "run"
    inner: Inner = dataclasses.field(default_factory=Inner)
    layers: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    limit: Optional[int] = None
    flag: bool = False


def test_from_dict_builds_nested_and_coerces_ints_to_float():
    cfg = from_dict(Outer, {"inner": {"size": 8, "rate": 1}, "layers": [3], "limit": 5})
    assert cfg.inner.size == 8 and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.layers == [3] and cfg.limit == 5 and cfg.name == "run"


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"inner": {"sise": 3}}, "inner.sise"),
        ({"inner": {"size": "big"}}, "inner.size"),
        ({"inner": {"mode": "c"}}, "inner.mode"),
        ({"flag": "yes"}, "flag"),
        ({"inner": {"size": -1}}, "size must be positive"),
        ({"layers": [1, "x"]}, "layers[1]"),
    ],
)
def test_bad_values_name_the_key(data, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        from_dict(Outer, data)


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides({"inner": {"size": 2}}, ["inner.rate=1e-3", "flag=true", "limit=null", "layers=[4, 5]"])
    cfg = from_dict(Outer, data)
    assert cfg.inner.rate == pytest.approx(1e-3) and cfg.flag is True and cfg.limit is None
    assert cfg.layers == [4, 5] and cfg.inner.size == 2


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"name": "x"}, ["name.sub=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["noequals"])


def test_roundtrip_through_yaml_file(tmp_path):
    cfg = from_dict(Outer, {"inner": {"size": 16, "mode": "b"}, "name": "x"})
    dump_yaml(cfg, tmp_path / "c.yaml")
    again = load_config(Outer, tmp_path / "c.yaml", ["inner.size=32"])
    assert to_dict(again) == {**to_dict(cfg), "inner": {**to_dict(cfg.inner), "size": 32}}
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inner:\n  size: zero\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: inner\.size"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")


@dataclasses.dataclass(kw_only=True)
class Moved:
    """A section whose `size` and `mode` moved into `inner`."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {"size": "inner.size", "mode": "inner.mode"}

    name: str = "run"
    inner: Inner = dataclasses.field(default_factory=Inner)


@dataclasses.dataclass(kw_only=True)
class Top:
    moved: Moved = dataclasses.field(default_factory=Moved)
    limit: Optional[int] = None


def test_former_keys_load_at_their_new_path_with_a_warning(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text("moved:\n  size: 8\n  inner:\n    rate: 0.5\n")
    with caplog.at_level("WARNING", logger="megatron_taskmoe.config_io"):
        cfg = load_config(Top, path)
    assert cfg.moved.inner == Inner(size=8, rate=0.5)
    assert "moved.size is now moved.inner.size" in caplog.text
    with caplog.at_level("WARNING", logger="megatron_taskmoe.config_io"):
        assert from_dict(Moved, {"mode": "b"}).inner.mode == "b"
    assert "mode is now inner.mode" in caplog.text
    # overrides: the new dotted path, and the former key (rewritten, with a warning), over a file in either form
    assert load_config(Top, path, ["moved.inner.size=16"]).moved.inner.size == 16
    caplog.clear()
    with caplog.at_level("WARNING", logger="megatron_taskmoe.config_io"):
        assert load_config(Top, path, ["moved.size=32", "moved.mode=b"]).moved.inner == Inner(size=32, rate=0.5,
                                                                                               mode="b")
    assert "--set moved.size: the key is now moved.inner.size" in caplog.text
    assert load_config(Top, None, ["moved.size=2", "limit=3"]) == Top(moved=Moved(inner=Inner(size=2)), limit=3)


def test_a_setting_given_under_both_keys_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("moved:\n  size: 8\n  inner:\n    size: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: moved\.size and moved\.inner\.size are the same setting"):
        load_config(Top, path)
    with pytest.raises(ConfigError, match=r"size and inner\.size are the same setting"):
        from_dict(Moved, {"size": 8, "inner": {"size": 4}})
    with pytest.raises(ConfigError, match=r"moved\.size belongs in the section moved\.inner\.size"):
        from_dict(Top, {"moved": {"size": 8, "inner": 3}})
