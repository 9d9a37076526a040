"""Crash-safe checkpoints and file writes, loadable with ``torch.load(weights_only=True)``.

Payload rules (checked before anything touches the disk, violations raise ``TypeError`` with the
key path): values are tensors (parameters included), ``torch.Size``, ``torch.dtype``,
``torch.device``, ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, or lists, tuples
and dicts (``OrderedDict`` too) of those; dict keys are ``str``/``int``/``float``/``bool``/
``None`` or tuples of them. Paths (``os.PathLike``) are stored as ``str``. Anything else (class
instances, sets, numpy arrays, slices, ...) is refused, because weights-only loading refuses it.
RNG states go through :func:`rng_state`, which already has this form.

Writes: payload → ``.NAME.tmp`` in the same folder, flush + fsync, the current file becomes
``NAME-stem.prev.suffix`` (``checkpoint.prev.pt``), the temp file replaces ``NAME``, the folder
is fsynced. At every instant at least one complete checkpoint is on disk.
"""

from __future__ import annotations

import io
import os
import random
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mlsgd_dsl.errors import RunError

CHECKPOINT_NAME = "checkpoint.pt"
_LEAVES = (type(None), bool, int, float, str, bytes, torch.Tensor, torch.Size, torch.dtype,
           torch.device)
_KEYS = (type(None), bool, int, float, str)


def previous_path(path: Path) -> Path:
    """``checkpoint.pt`` → ``checkpoint.prev.pt``: the complete copy before the newest one."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _where(trail: tuple[str, ...]) -> str:
    return "".join(trail) or "<payload>"


def _weights_only_safe(value: Any, trail: tuple[str, ...] = ()) -> Any:
    """A copy of the containers of ``value`` that weights-only loading accepts (tensors shared)."""
    if isinstance(value, _LEAVES):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = OrderedDict() if isinstance(value, OrderedDict) else {}
        for key, item in value.items():
            keys = key if isinstance(key, tuple) else (key,)
            if not all(isinstance(k, _KEYS) for k in keys):
                raise TypeError(f"checkpoint payload {_where(trail)}: key {key!r} of type "
                                f"{type(key).__name__} is not allowed in a weights-only file")
            out[key] = _weights_only_safe(item, (*trail, f"[{key!r}]"))
        return out
    if isinstance(value, (list, tuple)):
        items = [_weights_only_safe(v, (*trail, f"[{i}]")) for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise TypeError(f"checkpoint payload {_where(trail)}: {type(value).__qualname__} is not "
                    "allowed in a weights-only file; store tensors, numbers, strings or "
                    "lists/dicts of them")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; os.replace is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, keep_previous: bool = False) -> None:
    """Replace ``path`` by ``data`` so that readers see the old or the new file, never a mix.

    One process writes a given path: the temp name is fixed, so a temp file left by a crash
    is overwritten by the next write instead of piling up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if keep_previous and path.exists():
        prev = previous_path(path)
        prev_tmp = prev.with_name(f".{prev.name}.tmp")
        try:  # a hard link keeps `path` in place while the older copy moves
            if prev_tmp.exists():
                prev_tmp.unlink()
            os.link(path, prev_tmp)
            os.replace(prev_tmp, prev)
        except OSError:
            os.replace(path, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(path: Path, payload: dict, *, keep_previous: bool = True) -> None:
    """Write ``payload`` atomically; the file it replaces is kept as ``*.prev.pt``."""
    buffer = io.BytesIO()
    torch.save(_weights_only_safe(payload), buffer)
    atomic_write_bytes(Path(path), buffer.getvalue(), keep_previous=keep_previous)


def load_checkpoint(path: Path, *, map_location: str | torch.device | None = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a bad file → :class:`RunError`."""
    path = Path(path)
    if not path.is_file():
        raise RunError("checkpoint file does not exist", file=str(path))
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = (f"; {previous_path(path).name} holds the copy before it"
                if previous_path(path).is_file() else "")
        raise RunError(f"checkpoint is corrupt, truncated or not weights-only loadable "
                       f"({first}){hint}", file=str(path)) from exc
    if not isinstance(payload, dict):
        raise RunError(f"checkpoint holds a {type(payload).__name__}, expected a dict",
                       file=str(path))
    return payload


def _looks_complete(path: Path) -> bool:
    # torch.save writes a zip; a truncated one lacks its central directory.
    return path.is_file() and zipfile.is_zipfile(path)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """``run_dir/checkpoint.pt``, else ``checkpoint.prev.pt`` when that alone is complete."""
    current = Path(run_dir) / CHECKPOINT_NAME
    for candidate in (current, previous_path(current)):
        if _looks_complete(candidate):
            return candidate
    return None


def rng_state() -> dict[str, Any]:
    """Python ``random``, torch CPU and (when present) CUDA generator states, weights-only safe."""
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only for the GPUs present)."""
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss_next))
    torch.set_rng_state(state["torch"].to(device="cpu", dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = min(len(cuda), torch.cuda.device_count())
        for index in range(count):
            torch.cuda.set_rng_state(cuda[index].to(device="cpu", dtype=torch.uint8), index)


def network_mismatch(saved: Any, current: Mapping[str, torch.Tensor]) -> str | None:
    """Why the state dict ``saved`` cannot be loaded into a network whose state is ``current``
    (names and shapes), or None when it can."""
    if not isinstance(saved, Mapping):
        return "the checkpoint has no network state"
    missing = [k for k in current if k not in saved]
    extra = [k for k in saved if k not in current]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. "
                         f"{missing[0]!r}")
        if extra:
            parts.append(f"{len(extra)} tensor(s) this network lacks, e.g. {extra[0]!r}")
        return "; ".join(parts)
    for name, tensor in current.items():
        other = saved[name]
        if not isinstance(other, torch.Tensor) or tuple(other.shape) != tuple(tensor.shape):
            got = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            return f"{name!r} is {tuple(tensor.shape)} here and {got} in the checkpoint"
    return None
