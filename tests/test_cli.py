"""The ``mlsgd-dsl`` command line, in-process (and once as a real process)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlsgd_dsl import __version__
from mlsgd_dsl.registry import PluginWarning
from mlsgd_dsl.schema import json_schema

pytestmark = pytest.mark.usefixtures("one_thread")

QUICKSTART = Path(__file__).resolve().parents[1] / "hierarchies" / "quickstart.toml"

FAILING_CHECK = """
from mlsgd_dsl.api import Check, CheckRow
from mlsgd_dsl.hookspecs import hookimpl


@hookimpl
def mlsgd_checks():
    return [Check("always.fails", lambda c: [CheckRow("always fails", "fail", "on purpose")])]
"""


def test_validate_prints_the_table(run_cli) -> None:
    rc, out, err = run_cli(["validate", QUICKSTART])
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{QUICKSTART}: quickstart — levels (coarsest first): coarse (")
    assert lines[1].split() == ["check", "status", "detail"]
    assert any(line.startswith("mid->fine: coverage") and " pass " in line for line in lines)
    assert lines[-1].endswith(" 0 failed")
    assert "Traceback" not in out + err


def test_validate_exits_1_when_a_check_fails(run_cli, install_plugin) -> None:
    install_plugin(FAILING_CHECK, ep="failing")
    rc, out, err = run_cli(["validate", QUICKSTART])
    assert rc == 1, err
    assert any(line.split()[:3] == ["always", "fails", "fail"] for line in out.splitlines())
    assert out.splitlines()[-1].endswith("1 failed")
    rc, out, _ = run_cli(["-p", "no:failing", "validate", QUICKSTART])
    assert rc == 0 and "always fails" not in out


def test_validate_json(run_cli) -> None:
    rc, out, err = run_cli(["validate", "--json", "--seed", "3", QUICKSTART])
    assert rc == 0, err
    report = json.loads(out)
    assert report["ok"] is True
    assert report["rows"][0] == {"name": "references", "status": "pass",
                                 "detail": report["rows"][0]["detail"]}
    assert all(set(r) == {"name", "status", "detail"} for r in report["rows"])
    assert {r["status"] for r in report["rows"]} <= {"pass", "warn"}


def test_validate_with_set(run_cli) -> None:
    four = '{ rules = { "blocks.*.layers.*" = { rule = "depth.constant", factor = 4 } } }'
    rc, out, err = run_cli([
        "validate", QUICKSTART, "--set", "levels.mid.model.layers=1",
        "--set", f"edges=[{{ coarse = 'mid', fine = 'fine', transfer = {four} }}, "
                 "{ coarse = 'coarse', fine = 'mid', transfer = { rules = {} } }]"])
    assert rc == 0, err
    assert re.search(r"mid->fine blocks\.\*\.layers\.\* \[depth\.constant\]: R∘P = I +pass", out)
    assert "coarse->mid * [identity]: adjoint" in out
    assert "coarse->mid blocks" not in out
    rc, out, err = run_cli(["validate", QUICKSTART, "--set", "mlsgd.cycles=0"])
    assert (rc, out) == (2, "")
    assert err == (f"mlsgd-dsl: error: {QUICKSTART}: mlsgd.cycles: input should be greater "
                   "than or equal to 1, got 0\n")
    rc, _, err = run_cli(["validate", QUICKSTART, "--set", "mlsgd.cycles"])
    assert rc == 2
    assert err == ("mlsgd-dsl: error: --set: override 'mlsgd.cycles' is not of the form "
                   "key.path=value\n")


def test_schema(run_cli) -> None:
    rc, out, _ = run_cli(["schema"])
    assert rc == 0
    assert json.loads(out) == json_schema()
    rc, out, _ = run_cli(["schema", "--indent", "0"])
    assert json.loads(out) == json_schema()


def test_plugins_lists_built_ins_entry_points_broken_and_blocked(run_cli,
                                                                 install_plugin) -> None:
    install_plugin("raise ImportError('needs foo')", ep="broken", dist="brokenplugin")
    install_plugin(FAILING_CHECK, ep="failing", dist="failingplugin", version="2.5")
    with pytest.warns(PluginWarning, match=r"plugin broken \(brokenplugin 0.1\)"):
        rc, out, err = run_cli(["-p", "no:data", "plugins"])
    assert rc == 0, err
    assert f"transfers  [built-in ({__version__})]" in out
    assert "    transfer rules: identity, depth.constant, depth.linear" in out
    assert "failing  [failingplugin 2.5]\n    checks: always.fails\n" in out
    assert "BROKEN plugin broken (brokenplugin 0.1): failed to import" in out
    assert "ImportError: needs foo" in out
    assert out.rstrip().endswith("blocked: data")
    assert "data sources:" not in out


def test_plugins_without_autoload(run_cli, install_plugin) -> None:
    install_plugin(FAILING_CHECK, ep="failing")
    rc, out, _ = run_cli(["--no-plugin-autoload", "plugins"])
    assert rc == 0 and "failing" not in out and "transfers  [built-in" in out


def test_blocking_a_needed_plugin_is_a_user_error(run_cli) -> None:
    rc, out, err = run_cli(["-p", "no:transfers", "validate", QUICKSTART])
    assert (rc, out) == (2, "")
    assert err.startswith(f"mlsgd-dsl: error: {QUICKSTART}: transfer.default: no transfer "
                          "rule named 'identity' is installed")
    rc, _, err = run_cli(["-p", "transfers", "plugins"])
    assert rc == 2 and err == "mlsgd-dsl: error: -p transfers: expected -p no:NAME\n"


def test_graph_mermaid(run_cli) -> None:
    rc, out, err = run_cli(["graph", QUICKSTART])
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "graph BT"
    assert lines[1].startswith('    coarse["coarse<br/>h=4, 13,450 params<br/>input 1x16x16"]')
    assert '    coarse -->|"P: depth.constant, identity"| mid' in lines
    assert '    mid -->|"P: depth.constant, identity"| fine' in lines


def test_graph_dot(run_cli) -> None:
    rc, out, err = run_cli(["graph", "--format", "dot", QUICKSTART,
                            "--set", 'transfer.rules."blocks.*.layers.*"=depth.linear'])
    assert rc == 0, err
    assert out.startswith("digraph hierarchy {\n    rankdir=BT;")
    assert '    "fine" [label="fine\\nh=1, 22,234 params\\ninput 1x16x16"];' in out
    assert '    "coarse" -> "mid" [label="P: depth.linear, identity"];' in out
    assert out.rstrip().endswith("}")


@pytest.mark.skipif(shutil.which("dot") is not None, reason="Graphviz is installed")
def test_graph_png_without_graphviz(run_cli, tmp_path) -> None:
    rc, out, err = run_cli(["graph", QUICKSTART, "--png", tmp_path / "g.png"])
    assert (rc, out) == (2, "")
    assert err.startswith("mlsgd-dsl: error: --png needs Graphviz' `dot` on PATH")


def test_version_and_usage(run_cli) -> None:
    assert run_cli(["--version"]) == (0, f"mlsgd-dsl {__version__}\n", "")
    rc, _, err = run_cli([])
    assert rc == 2 and "usage: mlsgd-dsl" in err
    rc, _, err = run_cli(["validate"])
    assert rc == 2 and "required: file" in err


def test_real_process_reports_a_malformed_file_cleanly(tmp_hierarchy) -> None:
    bad = tmp_hierarchy('name = "x"\n[levels.fine]\nmodel = { family = "ruthotto-resnet" }\n'
                        "colour = 1\n")
    proc = subprocess.run([sys.executable, "-m", "mlsgd_dsl", "validate", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (f"mlsgd-dsl: error: {bad}: levels.fine.colour: unknown key; valid "
                           "keys: extends, description, h, model, data\n")
