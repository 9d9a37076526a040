"""``mlsgd-dsl graph``: the level graph as Mermaid or Graphviz DOT text (PNG via ``dot``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .compiler import Compiled
from .errors import UserError


def _label(c: Compiled, name: str) -> str:
    node = c.nodes[name]
    shape = "x".join(map(str, node.input_shape))
    return f"{name}<br/>h={node.h:g}, {node.n_parameters:,} params<br/>input {shape}"


def mermaid(c: Compiled) -> str:
    lines = ["graph BT"]
    for name in c.levels:
        lines.append(f'    {name}["{_label(c, name)}"]')
    for coarse, fine in c.graph.edges:
        rules = sorted({g.rule for g in c.edge(coarse, fine).full})
        lines.append(f'    {coarse} -->|"P: {", ".join(rules)}"| {fine}')
    return "\n".join(lines)


def dot(c: Compiled) -> str:
    lines = ["digraph hierarchy {", "    rankdir=BT;", "    node [shape=box];"]
    for name in c.levels:
        lines.append(f'    "{name}" [label="{_label(c, name).replace("<br/>", chr(92) + "n")}"];')
    for coarse, fine in c.graph.edges:
        rules = sorted({g.rule for g in c.edge(coarse, fine).full})
        lines.append(f'    "{coarse}" -> "{fine}" [label="P: {", ".join(rules)}"];')
    lines.append("}")
    return "\n".join(lines)


def render(c: Compiled, fmt: str = "mermaid", *, png: Path | None = None) -> str:
    text = mermaid(c) if fmt == "mermaid" else dot(c)
    if png is not None:
        exe = shutil.which("dot")
        if exe is None:
            raise UserError("--png needs Graphviz' `dot` on PATH (apt-get install graphviz); "
                            "the DOT text is printed by --format dot")
        subprocess.run([exe, "-Tpng", "-o", str(png)], input=dot(c).encode(), check=True)
    return text
