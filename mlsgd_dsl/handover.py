"""The trained network out of a run folder: weights, ``load_model``, ``evaluate``, ``export``.

At the end of every run (and when a ``--resume`` completes) the runner calls
:func:`save_network`: the finest network's state dict, with the BatchNorm statistics the
summary's numbers were computed with, goes to ``network.safetensors`` — a format that holds
tensors and string metadata only, so opening it cannot run code (unlike a pickled
``checkpoint.pt``). The metadata records what rebuilding the architecture needs besides
``resolved.toml``: the level, its input shape and class count, and the training split's
per-channel normalisation, so the data set does not have to be present to load the network.

:func:`load_model` rebuilds the finest level's architecture from ``resolved.toml`` and loads the
weights. By default the module it returns takes images as the data source provides them, on
the [0, 1] scale (uint8 / 255), ``(N, C, H, W)``: the normalisation (and any coarsening of the
finest level) is part of it. :func:`export` writes that same module as TorchScript or as a
``torch.export`` program, which plain PyTorch loads without mlsgd-dsl.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import ModelContext
from .errors import ConfigError, RunError, UserError

NETWORK_FILE = "network.safetensors"
NETWORK_FORMAT = "mlsgd-dsl.network/1"
EXPORT_FORMATS = {"torchscript": "network.torchscript.pt", "exported": "network.pt2"}


class Classifier(nn.Module):
    """Normalisation, the finest level's coarsening, then the trained network.

    Input: images on the [0, 1] scale, ``(N, C, H, W)`` at the data's size.
    """

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float],
                 coarsen: Sequence[tuple[Callable[[Tensor, Any], Tensor], Any]] = ()) -> None:
        super().__init__()
        self.network = network
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))
        self._coarsen = list(coarsen)

    def forward(self, x: Tensor) -> Tensor:
        # the same operations, in the same order, as the data preparation of a run
        x = x.sub(self.mean).div(self.std)
        for apply, options in self._coarsen:
            x = apply(x, options)
        return self.network(x)


# --------------------------------------------------------------------------- writing


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                               suffix=f".tmp{path.suffix}")  # torch.export wants its suffix
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _source_shape(compiled: Any) -> tuple[int, int, int]:
    """(C, H, W) of the data source's images, before any level's coarsening."""
    h = compiled.hierarchy
    entry = compiled.registry.get("data sources", h.data.source)
    c, height, width, _ = entry.record.shape(h._plugin_options[("data",)])
    return int(c), int(height), int(width)


def save_network(out_dir: Path, model: nn.Module, compiled: Any, level: str,
                 splits: Any) -> Path:
    """Write ``network.safetensors`` (the weights of ``model``, the finest level's network)."""
    from safetensors.torch import save_file

    node = compiled.nodes[level]
    tensors = {k: v.detach().to("cpu").clone().contiguous()
               for k, v in model.state_dict().items()}
    meta = {
        "format": NETWORK_FORMAT,
        "level": level,
        "family": node.family.record.name,
        "source_shape": json.dumps(list(_source_shape(compiled))),
        "input_shape": json.dumps(list(node.input_shape)),
        "num_classes": str(node.num_classes),
        "h": repr(float(node.h)),
        "mean": json.dumps(list(splits.mean)),
        "std": json.dumps(list(splits.std)),
        "classes": json.dumps(splits.classes),
        "config_hash": compiled.config_hash(),
    }
    path = Path(out_dir) / NETWORK_FILE
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def save_network_or_warn(out_dir: Path, model: nn.Module, compiled: Any, level: str,
                         splits: Any) -> Path | None:
    """:func:`save_network`; a network that cannot be written costs the file, not the run
    (its summary is written already)."""
    import sys

    try:
        return save_network(out_dir, model, compiled, level, splits)
    except Exception as exc:
        print(f"mlsgd-dsl: warning: {NETWORK_FILE} not written ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return None


# --------------------------------------------------------------------------- reading


def read_network(run_dir: Path | str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights and the decoded metadata of a run folder's ``network.safetensors``."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    path = run_dir / NETWORK_FILE
    if not run_dir.is_dir():
        raise RunError("no such run folder", file=str(run_dir))
    if not path.is_file():
        raise RunError(f"no {NETWORK_FILE} in this run folder (the run has not finished; "
                       "finish it with mlsgd-dsl run FILE --resume RUN_DIR)", file=str(run_dir))
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        if raw.get("format") != NETWORK_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {NETWORK_FORMAT!r}")
        meta: dict[str, Any] = {"level": raw["level"], "family": raw["family"],
                                "config_hash": raw.get("config_hash")}
        for key in ("source_shape", "input_shape", "mean", "std", "classes"):
            meta[key] = json.loads(raw[key])
        meta["num_classes"], meta["h"] = int(raw["num_classes"]), float(raw["h"])
    except Exception as exc:  # damaged or foreign file: one line, never a traceback
        raise RunError(f"cannot read {NETWORK_FILE} ({type(exc).__name__}: {exc})",
                       file=str(path)) from None
    return tensors, meta


def _hierarchy(run_dir: Path, overrides: Sequence[str] = (), registry: Any = None) -> Any:
    from .loader import load

    resolved = run_dir / "resolved.toml"
    if not resolved.is_file():
        raise RunError("no resolved.toml in this run folder", file=str(run_dir))
    return load(resolved, list(overrides), registry=registry)


def build_network(run_dir: Path | str, *, registry: Any = None) -> nn.Module:
    """The finest level's network with the trained weights, in eval mode (no normalisation)."""
    run_dir = Path(run_dir)
    tensors, meta = read_network(run_dir)
    h = _hierarchy(run_dir, registry=registry)
    level = meta["level"]
    if level not in h.levels:
        raise RunError(f"resolved.toml has no level {level!r} (the network's level)",
                       file=str(run_dir))
    family = h._registry.get("architectures", h.levels[level].model.family)
    options = h._plugin_options[("levels", level, "model")]
    c, height, width = meta["input_shape"]
    ctx = ModelContext(in_channels=c, image_size=(height, width),
                       num_classes=meta["num_classes"], h=meta["h"])
    try:
        network = family.record.build(options, ctx)
        network.load_state_dict(tensors, strict=True)
    except Exception as exc:
        raise RunError(f"cannot rebuild level {level!r} ({family.record.name}) with the saved "
                       f"weights: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                       file=str(run_dir)) from None
    return network.eval()


def _coarsening(h: Any, level: str) -> list[tuple[Callable[[Tensor, Any], Tensor], Any]]:
    steps = []
    for i, step in enumerate(h.levels[level].data.coarsen):
        entry = h._registry.get("coarsenings", step.method)
        steps.append((entry.record.apply, h._plugin_options[("levels", level, "data",
                                                             "coarsen", i)]))
    return steps


def load_model(run_dir: Path | str, *, preprocessing: bool = True,
               registry: Any = None) -> nn.Module:
    """The trained finest network of a run folder, ready in eval mode (on the CPU).

    With ``preprocessing`` (the default) the module takes images on the [0, 1] scale (uint8
    images divided by 255), ``(N, C, H, W)`` at the data source's size, and applies the
    training split's normalisation (and the finest level's coarsening) itself; without, it is
    the bare network, which expects normalised images. Its ``classes`` attribute lists the
    class names (None when the data set names none).
    """
    run_dir = Path(run_dir)
    network = build_network(run_dir, registry=registry)
    _, meta = read_network(run_dir)
    if not preprocessing:
        return network
    h = _hierarchy(run_dir, registry=registry)
    model = Classifier(network, meta["mean"], meta["std"], _coarsening(h, meta["level"]))
    model.classes = meta["classes"]
    return model.eval()


# --------------------------------------------------------------------------- evaluate


def evaluate_run(run_dir: Path | str, overrides: Sequence[str] = (), *,
                 batch_size: int = 1000) -> dict[str, Any]:
    """Accuracy and mean cross entropy of a run's network on the test split.

    ``overrides`` (``data.KEY=VALUE`` only) point at another data set of the same shape; its
    images are normalised with the statistics the network was trained with.
    """
    from .compiler import compile as compile_hierarchy

    run_dir = Path(run_dir)
    for item in overrides:
        if not str(item).startswith("data."):
            raise UserError(f"--set {item}: evaluate accepts data.* settings only (the network "
                            "is the run's)")
    network = build_network(run_dir)
    _, meta = read_network(run_dir)
    # the run's own normalisation, not one computed from the (maybe other) data set
    h = _hierarchy(run_dir, [*overrides, "data.normalize=false"])
    compiled = compile_hierarchy(h)
    level = meta["level"]
    node = compiled.nodes.get(level)
    if node is None or list(node.input_shape) != meta["input_shape"] or \
            node.num_classes != meta["num_classes"]:
        got = f"{tuple(node.input_shape)}, {node.num_classes} classes" if node else "none"
        raise ConfigError(f"this data gives level {level!r} images {got}; the network takes "
                          f"{tuple(meta['input_shape'])}, {meta['num_classes']} classes",
                          file=str(run_dir / "resolved.toml"), path=("data",))
    splits = compiled.data()[level]
    c = len(meta["mean"])
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, c, 1, 1)
    x, y = splits.test_x, splits.test_y
    loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out = network(x[start:start + batch_size].sub(mean).div(std))
            yb = y[start:start + batch_size]
            loss += float(F.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    n = max(len(x), 1)
    return {"test_acc": correct / n, "test_loss": loss / n, "images": len(x),
            "source": h.data.source}


# --------------------------------------------------------------------------- export


def _write_export(model: nn.Module, fmt: str, path: Path, example: Tensor) -> Tensor:
    """Write ``model`` as ``fmt`` to ``path``, load it back, return its outputs on ``example``."""
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        _atomic(path, lambda tmp: torch.jit.save(traced, tmp))
        loaded = torch.jit.load(str(path))
    else:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        _atomic(path, lambda tmp: torch.export.save(program, tmp))
        loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        return loaded(example)


def export(run_dir: Path | str, fmt: str, out: Path | str | None = None) -> Path:
    """Write the preprocessing network (see :func:`load_model`) for plain PyTorch.

    ``torchscript``: ``torch.jit.load(path)``; ``exported``: ``torch.export.load(path)
    .module()``. The batch size is free; the image size is the data's. The file is checked by
    loading it back and comparing its outputs with the module's.
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(EXPORT_FORMATS)}")
    run_dir = Path(run_dir)
    model = load_model(run_dir)
    _, meta = read_network(run_dir)
    path = Path(out) if out is not None else run_dir / EXPORT_FORMATS[fmt]
    if path.is_dir():
        path = path / EXPORT_FORMATS[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, *meta["source_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(example)
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in PyTorch (a FutureWarning) and tracing warns about
            # Python branches on sizes; both are about the tracer, not this network
            warnings.simplefilter("ignore")
            got = _write_export(model, fmt, path, example)
    except Exception as exc:
        raise RunError(f"cannot export the network as {fmt}: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}",
                       file=str(run_dir)) from None
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise RunError(f"the {fmt} export computes different outputs than the network "
                       f"(max difference {float((got - expected).abs().max()):.3g})",
                       file=str(path))
    return path
