"""The loader: inheritance, ``--set`` overrides, per-level tables, the JSON Schema export."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

import mlsgd_dsl
from mlsgd_dsl.errors import ConfigError
from mlsgd_dsl.loader import (
    deep_merge,
    parse_override,
    read_toml,
    resolve_file_inheritance,
    resolve_inheritance,
)
from mlsgd_dsl.schema import json_schema

pytestmark = pytest.mark.usefixtures("one_thread")

HIERARCHIES = Path(__file__).resolve().parents[1] / "hierarchies"
QUICKSTART = HIERARCHIES / "quickstart.toml"
DEPTH = HIERARCHIES / "depth-cifar10.toml"
SHIPPED = sorted(HIERARCHIES.rglob("*.toml"))

TINY = """
name = "tiny"
[data]
options = { train = 20, test = 10, size = 8 }
[model]
family = "ruthotto-resnet"
channels = [2]
[levels.fine]
description = "the finest level"
h = 1.0
model = { layers = 4, kernel_size = 5 }
[levels.mid]
extends = "fine"
h = 2.0
model = { layers = 2 }
[levels.coarse]
extends = "mid"
h = 4.0
model = { layers = 1 }
"""


def model_options(h, level: str) -> dict:
    return h.levels[level].model.options()


# --------------------------------------------------------------------------- inheritance


def test_top_level_model_defaults_reach_every_level() -> None:
    h = mlsgd_dsl.load(QUICKSTART)
    for level, layers in [("fine", 4), ("mid", 2), ("coarse", 1)]:
        assert h.levels[level].model.family == "ruthotto-resnet"
        assert model_options(h, level) == {"channels": [8, 16], "layers": layers}


def test_level_value_overrides_the_default_for_that_level_only() -> None:
    h = mlsgd_dsl.load(QUICKSTART, overrides=["levels.mid.model.channels=[4, 8]"])
    assert model_options(h, "mid")["channels"] == [4, 8]
    assert model_options(h, "fine")["channels"] == [8, 16]


def test_level_extends_deep_merges_along_the_chain() -> None:
    h = mlsgd_dsl.loads(TINY)
    coarse = h.levels["coarse"]
    assert coarse.extends == "mid"
    assert coarse.h == 4.0
    # kernel_size comes from fine through mid, layers from coarse itself, channels from [model]
    assert model_options(h, "coarse") == {"channels": [2], "layers": 1, "kernel_size": 5}
    assert h.levels["fine"].description == "the finest level"
    assert h.levels["mid"].description == ""  # descriptions describe one level: not inherited


def test_extends_is_resolved_regardless_of_file_order() -> None:
    text = TINY.replace('extends = "mid"', "").replace('extends = "fine"', 'extends = "coarse"')
    h = mlsgd_dsl.loads(text)  # mid now extends coarse, which is written after it
    assert model_options(h, "mid") == {"channels": [2], "layers": 2}


def test_deep_merge_merges_tables_and_replaces_everything_else() -> None:
    base = {"a": {"x": 1, "y": {"z": [1, 2]}}, "b": [1, 2], "c": 1}
    top = {"a": {"y": {"z": [3]}, "w": 2}, "b": [9], "d": {"e": 1}}
    merged = deep_merge(base, top)
    assert merged == {"a": {"x": 1, "y": {"z": [3]}, "w": 2}, "b": [9], "c": 1, "d": {"e": 1}}
    assert base == {"a": {"x": 1, "y": {"z": [1, 2]}}, "b": [1, 2], "c": 1}  # untouched
    top["d"]["e"] = 5
    assert merged["d"]["e"] == 1  # copied, not shared


def test_file_extends_deep_merges_over_the_other_file(tmp_hierarchy, tmp_path) -> None:
    tmp_hierarchy(QUICKSTART.read_text(encoding="utf-8"), name="base.toml")
    (tmp_path / "sub").mkdir()
    child = tmp_hierarchy("""
        extends = "../base.toml"
        name = "child"
        [mlsgd]
        cycles = 5
        epochs = { fine = 2 }
        """, name="sub/child.toml")
    h = mlsgd_dsl.load(child)
    assert h.name == "child"
    assert h.extends is None
    assert h.description == "Depth hierarchy 4/2/1 layers on synthetic 16x16 images"
    assert h.mlsgd.cycles == 5
    assert h.mlsgd.epochs == {"fine": 2.0, "mid": 1.0, "coarse": 1.0}
    assert h.mlsgd.batch_size == 100


def test_file_extends_chains(tmp_hierarchy) -> None:
    tmp_hierarchy(QUICKSTART.read_text(encoding="utf-8"), name="a.toml")
    tmp_hierarchy('extends = "a.toml"\nname = "b"\n[mlsgd]\ncycles = 4\n', name="b.toml")
    c = tmp_hierarchy('extends = "b.toml"\nname = "c"\n[mlsgd]\nlr = 0.01\n', name="c.toml")
    h = mlsgd_dsl.load(c)
    assert (h.name, h.mlsgd.cycles, h.mlsgd.lr, h.mlsgd.batch_size) == ("c", 4, 0.01, 100)


def test_long_file_extends_chain_is_not_called_a_cycle(tmp_hierarchy) -> None:
    tmp_hierarchy(QUICKSTART.read_text(encoding="utf-8"), name="a10.toml")
    for i in reversed(range(10)):
        first = tmp_hierarchy(f'extends = "a{i + 1}.toml"\nname = "a{i}"\n', name=f"a{i}.toml")
    try:
        assert mlsgd_dsl.load(first).name == "a0"
    except ConfigError as exc:  # a cap on the depth is fine, calling it a cycle is not
        assert "cycle" not in str(exc)


def test_file_extends_needs_a_file_on_disk() -> None:
    with pytest.raises(ConfigError, match="extends: file inheritance needs a file on disk"):
        mlsgd_dsl.loads('extends = "quickstart.toml"\nname = "x"\n')


# --------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(("item", "expected"), [
    ("mlsgd.cycles=7", {"mlsgd": {"cycles": 7}}),
    ("mlsgd.lr=0.01", {"mlsgd": {"lr": 0.01}}),
    ("name=other", {"name": "other"}),
    ('description="two words"', {"description": "two words"}),
    ("description=two words", {"description": "two words"}),
    ("model.channels=[4, 8]", {"model": {"channels": [4, 8]}}),
    ("data.augment.flip=false", {"data": {"augment": {"flip": False}}}),
    ('mlsgd.correction={ strategy = "none" }', {"mlsgd": {"correction": {"strategy": "none"}}}),
    ('transfer.rules."fc.*"=identity', {"transfer": {"rules": {"fc.*": "identity"}}}),
    (" mlsgd.cycles = 3 ", {"mlsgd": {"cycles": 3}}),
    (("mlsgd.cycles", 2), {"mlsgd": {"cycles": 2}}),
    (("name", "x y"), {"name": "x y"}),
    (("model.channels", [4, 8]), {"model": {"channels": [4, 8]}}),
    (('transfer.rules."fc.*"', {"rule": "identity"}),
     {"transfer": {"rules": {"fc.*": {"rule": "identity"}}}}),
    (("data.augment.flip", True), {"data": {"augment": {"flip": True}}}),
])
def test_parse_override(item, expected) -> None:
    assert parse_override(item) == expected


@pytest.mark.parametrize(("item", "message"), [
    ("mlsgd.cycles", "is not of the form key.path=value"),
    ("=3", "has an empty key"),
    ("a..b=1", "is not a valid key path"),
    (("mlsgd.cycles", None), "unsupported type"),
])
def test_bad_override_is_a_config_error_naming_set(item, message) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_override(item)
    assert str(info.value).startswith("--set: ")


def test_overrides_in_both_forms_reach_the_hierarchy() -> None:
    h = mlsgd_dsl.load(QUICKSTART, overrides={"mlsgd.cycles": 2, "data.augment.flip": False})
    assert (h.mlsgd.cycles, h.data.augment.flip) == (2, False)
    h = mlsgd_dsl.load(QUICKSTART, overrides=["mlsgd.cycles=9", 'transfer.rules."fc.*"=identity',
                                              "mlsgd.epochs.mid=4"])
    assert h.mlsgd.cycles == 9
    assert h.transfer.rules == {"blocks.*.layers.*": "depth.constant", "fc.*": "identity"}
    assert h.mlsgd.epochs == {"fine": 1.0, "mid": 4.0, "coarse": 1.0}


def test_overrides_apply_before_inheritance() -> None:
    h = mlsgd_dsl.load(QUICKSTART, overrides=["model.channels=[4, 8]"])
    assert all(model_options(h, n)["channels"] == [4, 8] for n in h.levels)


def test_override_is_validated_like_the_file() -> None:
    with pytest.raises(ConfigError, match=r"quickstart.toml: mlsgd.cycles: input should be "
                                          r"greater than or equal to 1, got 0"):
        mlsgd_dsl.load(QUICKSTART, overrides={"mlsgd.cycles": 0})


def test_override_string_outside_the_basic_plane() -> None:
    h = mlsgd_dsl.load(QUICKSTART, overrides={"description": "fast 🚀"})
    assert h.description == "fast 🚀"
    h = mlsgd_dsl.load(QUICKSTART, overrides=["description=fast 🚀"])
    assert h.description == "fast 🚀"


def test_one_override_sets_one_key() -> None:
    with pytest.raises(ConfigError):
        parse_override('mlsgd.cycles=3\nname="injected"')


# --------------------------------------------------------------------------- per-level tables


def test_per_level_tables_and_scalars() -> None:
    h = mlsgd_dsl.load(DEPTH)
    assert h.for_level(h.mlsgd.epochs, "fine") == 3
    assert h.for_level(h.mlsgd.epochs, "coarse") == 7
    assert h.for_level(h.mlsgd.lr, "mid") == 0.05  # a scalar applies to every level
    h = mlsgd_dsl.load(DEPTH, overrides=[
        'mlsgd.optimizer={ fine = { name = "adam" }, mid = {}, coarse = { momentum = 0.9 } }',
        "mlsgd.batch_size={ fine = 10, mid = 20, coarse = 40 }"])
    assert h.for_level(h.mlsgd.optimizer, "fine").name == "adam"
    assert h.for_level(h.mlsgd.optimizer, "coarse").momentum == 0.9
    assert [h.for_level(h.mlsgd.batch_size, n) for n in h.levels] == [10, 20, 40]


def test_mlsgd_path_names_levels() -> None:
    h = mlsgd_dsl.load(QUICKSTART, overrides={"mlsgd.path": [["mid", "fine"],
                                                             ["coarse", "mid", "fine"]]})
    assert h.mlsgd.path == [["mid", "fine"], ["coarse", "mid", "fine"]]
    with pytest.raises(ConfigError, match=r"mlsgd.path\[1\]\[0\]: no level named 'top'"):
        mlsgd_dsl.load(QUICKSTART, overrides={"mlsgd.path": [["mid", "fine"], ["top", "fine"]]})


def test_loaded_hierarchy_remembers_file_and_plugin_options(registry) -> None:
    h = mlsgd_dsl.load(QUICKSTART)
    assert h._file == str(QUICKSTART)
    assert h._registry is registry
    assert h._plugin_options[("data",)].size == 16
    entry, options = h._plugin_options[("transfer", "rules", "blocks.*.layers.*")]
    assert (entry.record.name, options.factor) == ("depth.constant", 2)


def test_loads_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^<string>: name: required key is missing"):
        mlsgd_dsl.loads("[data]\n")
    with pytest.raises(ConfigError, match=r"^cfg: not valid TOML"):
        mlsgd_dsl.loads("x = ", file="cfg")


# --------------------------------------------------------------------------- JSON Schema


@pytest.fixture(scope="module")
def schema() -> dict:
    return json_schema()


def test_schema_is_a_valid_json_schema(schema) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")
    json.dumps(schema)  # serialisable as it is printed


def resolved(path: Path) -> dict:
    data = read_toml(path.read_text(encoding="utf-8"), str(path))
    data = resolve_file_inheritance(data, str(path), path.parent, (str(path),))
    return resolve_inheritance(data, str(path))


def test_schema_accepts_resolved_shipped_files_and_refuses_unknown_keys(schema) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    for path in SHIPPED:
        data = resolved(path)
        assert not list(validator.iter_errors(data)), path
        assert not validator.is_valid({**data, "colour": "red"})
        assert not validator.is_valid({**data, "mlsgd": {**data["mlsgd"], "cycles": 0}})


def test_shipped_files_validate_against_the_schema(schema) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    problems = [f"{path.name}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                for path in SHIPPED
                for e in validator.iter_errors(read_toml(path.read_text(encoding="utf-8"),
                                                         str(path)))]
    assert not problems
