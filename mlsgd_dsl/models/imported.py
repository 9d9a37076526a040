"""The ``import`` family: a user's own model, built by ``factory = "package.module:callable"``.

Naming a module imports it, which runs its code, as running a script would: a hierarchy file
that uses this family is trusted input. What a file cannot do is call just any installed
function: the callable must be marked as a model factory (``@mlsgd_dsl.model_factory``, or an
entry point in ``mlsgd_dsl.model_factories``; see :mod:`mlsgd_dsl.factories`), and the mark is
checked before anything is called. The standard library is refused outright.

The callable receives ``kwargs`` from the file; parameters it *names* among ``in_channels``,
``num_classes``, ``image_size`` and ``h`` are filled from the level's data when the file does
not set them (``image_size`` is an int for square images, else ``(H, W)``). A bare
``**kwargs`` receives nothing extra: we only pass what the factory asks for by name.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..api import Architecture, ModelContext
from ..errors import ConfigError
from ..factories import ENTRY_POINT_GROUP, is_marked, listed_in_entry_points

_IDENT = r"[A-Za-z_]\w*"
_FACTORY = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
_PATH = ("model", "factory")
_CONTEXT_NAMES = ("in_channels", "num_classes", "image_size", "h")


class ImportOptions(BaseModel):
    """Options of the ``import`` family."""

    model_config = ConfigDict(extra="forbid")

    factory: str = Field(
        description='Callable returning an nn.Module, written "package.module:callable" '
                    '(the part after ":" may be dotted, e.g. "nets:Net.create").')
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the factory.")
    search_path: list[str] = Field(
        default_factory=list,
        description="Extra directories to import from (besides the hierarchy file's folder "
                    "and the current directory). Relative paths are taken from the hierarchy "
                    "file's folder.")

    @field_validator("factory")
    @classmethod
    def _factory_format(cls, value: str) -> str:
        if not _FACTORY.match(value):
            raise ValueError(f'must look like "package.module:callable", got {value!r}')
        return value


@contextmanager
def _import_path(extra: list[str]) -> Iterator[None]:
    """Temporarily put ``extra`` and the current directory in front of ``sys.path``."""
    saved = list(sys.path)
    wanted = [os.path.abspath(p) for p in extra] + [os.getcwd()]
    sys.path[:0] = [p for p in dict.fromkeys(wanted) if p not in sys.path]
    try:
        yield
    finally:
        sys.path[:] = saved


def _forget_stale(module_name: str, search_path: list[str]) -> None:
    """Drop a cached module that is not the file this hierarchy's search path points at.

    Two hierarchy files in one process may each ship their own ``nets.py``; ``import_module``
    alone would hand the second the first one's module.
    """
    top = module_name.split(".")[0]
    cached = sys.modules.get(top)
    if cached is None:
        return
    origin = getattr(cached, "__file__", None)
    for folder in search_path:
        base = Path(folder).resolve()
        for candidate in (base / f"{top}.py", base / top / "__init__.py"):
            if candidate.is_file():
                if origin is None or Path(origin).resolve() != candidate:
                    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                        del sys.modules[name]
                    importlib.invalidate_caches()
                return


def _resolve(factory: str, search_path: list[str] | None = None) -> Callable[..., Any]:
    module_name, _, attr_path = factory.partition(":")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        # A file must not be able to call os:system or shutil:rmtree through this family.
        raise ConfigError(f"{factory!r} names the Python standard library; the factory must "
                          "be your own model-building function", path=_PATH)
    _forget_stale(module_name, list(search_path or []))
    try:
        obj: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # a user module may fail in any way importing
        raise ConfigError(f"cannot import {module_name!r}: {_describe(exc)}", path=_PATH) from exc
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as exc:
            raise ConfigError(
                f"{factory!r}: {module_name!r} has no attribute {attr_path!r}", path=_PATH
            ) from exc
    if not callable(obj):
        raise ConfigError(f"{factory!r} is a {type(obj).__name__}, not a callable", path=_PATH)
    if not (is_marked(obj) or listed_in_entry_points(factory)):
        # checked before the call: a file must not use an arbitrary installed function
        # (numpy:savetxt, torch:save) as a "factory" that writes files
        raise ConfigError(f"{factory!r} is not marked as a model factory; decorate it with "
                          "@mlsgd_dsl.model_factory (or list it in the entry-point group "
                          f"{ENTRY_POINT_GROUP})", path=_PATH)
    return obj


def _describe(exc: BaseException) -> str:
    # ModuleNotFoundError already reads well; other errors need their type for context.
    if isinstance(exc, ModuleNotFoundError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _context_kwargs(fn: Callable[..., Any], given: dict[str, Any],
                    context: ModelContext) -> dict[str, Any]:
    """The context values ``fn`` names as parameters and ``given`` does not set."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C callables without a signature
        return {}
    height, width = context.image_size
    values = {
        "in_channels": context.in_channels,
        "num_classes": context.num_classes,
        "image_size": height if height == width else (height, width),
        "h": context.h,
    }
    named = {name for name, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {name: values[name] for name in _CONTEXT_NAMES
            if name in named and name not in given}


def source_digest(options: ImportOptions | dict[str, Any]) -> str:
    """Hash of the factory's code: the content of the file that defines the callable and of
    the module the factory string names (not their paths, so a moved project hashes the
    same). Other files they import are not included."""
    if not isinstance(options, ImportOptions):
        options = ImportOptions.model_validate(options)
    with _import_path(options.search_path):
        fn = _resolve(options.factory, options.search_path)
        module = sys.modules.get(options.factory.partition(":")[0])
    files: list[str] = []
    for candidate in (getattr(module, "__file__", None), _source_file(fn)):
        if candidate and candidate not in files:
            files.append(candidate)
    digest = hashlib.sha256(options.factory.encode())
    for name in files:
        try:
            digest.update(Path(name).read_bytes())
        except OSError:  # a compiled or zipped module: its name stands in for its content
            digest.update(os.path.basename(name).encode())
    return digest.hexdigest()[:16]


def _source_file(fn: Any) -> str | None:
    try:
        return inspect.getsourcefile(inspect.unwrap(getattr(fn, "__func__", fn)))
    except (TypeError, ValueError):
        return None


def build(options: ImportOptions | dict[str, Any], context: ModelContext) -> nn.Module:
    """Import the factory, call it with ``kwargs`` plus the context it names, check the result."""
    if not isinstance(options, ImportOptions):
        options = ImportOptions.model_validate(options)
    with _import_path(options.search_path):
        fn = _resolve(options.factory, options.search_path)
        kwargs = {**_context_kwargs(fn, options.kwargs, context), **options.kwargs}
        try:
            model = fn(**kwargs)
        except (Exception, SystemExit) as exc:
            raise ConfigError(
                f"{options.factory!r} raised {type(exc).__name__}: {exc}", path=_PATH) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{options.factory!r} returned {type(model).__name__}, not a torch.nn.Module",
            path=_PATH)
    return model


ARCHITECTURE = Architecture(
    name="import",
    options=ImportOptions,
    build=build,
    description='Your own model: factory = "package.module:callable" returning an nn.Module; '
                "named parameters in_channels / num_classes / image_size / h are filled from "
                "the level's data unless kwargs sets them.",
)
