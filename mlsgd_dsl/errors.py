"""User-facing errors: one readable line, exit code 2, never a traceback."""

from __future__ import annotations

from collections.abc import Sequence


def format_path(path: Sequence[str | int]) -> str:
    """``("levels", "fine", "model", "layers")`` → ``levels.fine.model.layers``; ints → ``[i]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            if len(text) > 60:  # a hostile key must not turn one line into a page
                text = text[:57] + "..."
            if text and all(c.isalnum() or c in "_-" for c in text):
                out += ("." if out else "") + text
            else:
                out += ("." if out else "") + '"' + text.replace('"', '\\"') + '"'
    return out


class UserError(Exception):
    """A mistake the user can fix. ``str()`` is the whole message the CLI prints."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None,
                 path: Sequence[str | int] | None = None) -> None:
        self.file = file
        self.path = tuple(path or ())
        self.message = message
        super().__init__(self.render())

    def render(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.path:
            where.append(format_path(self.path))
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class ConfigError(UserError):
    """The hierarchy file (or an override) is malformed or incoherent."""


class DataNotFound(UserError):
    """A data set is missing; the message says where we looked and how to get it."""


class PluginFailure(UserError):
    """A plugin used by the file failed; the message starts with ``plugin NAME (DIST VER):``."""


class RunError(UserError):
    """Training stopped in a bad state (NaN loss, refused resume, ...)."""
