"""Mistakes a user can make, each reported once with its place in their program."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, eq=False)
class Source:
    """A program text and the name it is reported under (a path or ``<string>``)."""

    name: str
    text: str = field(repr=False)

    def line(self, number: int) -> str:
        """The text of 1-based line ``number``, without its newline."""
        lines = self.text.splitlines()
        return lines[number - 1] if 0 < number <= len(lines) else ""


@dataclass(frozen=True)
class Location:
    """A span in a source: 1-based line and column of its start and end (end exclusive)."""

    source: Source | None
    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None

    @property
    def file(self) -> str:
        return self.source.name if self.source else "<unknown>"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def short(self) -> str:
        """``file:line`` with the file's base name, as the IR dump shows it."""
        name = self.file.replace("\\", "/").rsplit("/", 1)[-1]
        return f"{name}:{self.line}"

    def excerpt(self) -> str:
        """The source line and a caret line under this span, indented by four spaces."""
        if self.source is None:
            return ""
        text = self.source.line(self.line).expandtabs(1)
        if not text.strip():
            return ""
        end = self.end_col if self.end_line in (None, self.line) and self.end_col else None
        width = max(1, (end - self.col) if end else 1)
        width = min(width, max(1, len(text) - self.col + 1))
        caret = " " * (self.col - 1) + "^" + "~" * (width - 1)
        return f"    {text}\n    {caret}"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (a library's error, shown inside ours)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else "unreadable"


class CnncError(Exception):
    """A mistake in the user's program, weights, input or command line.

    ``where`` is a :class:`Location` in a program, or a plain string naming a
    file or other place (for files that are not programs).
    """

    kind = "error"

    def __init__(self, message: str, where: Location | str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint
        self.notes: list[str] = []  # where the place was reached from (block calls)

    @property
    def location(self) -> Location | None:
        return self.where if isinstance(self.where, Location) else None

    def at(self, where: Location | str | None) -> CnncError:
        """Give this error a place if it has none yet; returns self for ``raise e.at(loc)``."""
        if self.where is None:
            self.where = where
        return self

    def render(self) -> str:
        """The full report: ``place: error: message``, the source excerpt, the hint."""
        head = (
            f"{self.where}: {self.kind}: {self.message}"
            if self.where
            else f"{self.kind}: {self.message}"
        )
        parts = [head]
        if self.location is not None and (excerpt := self.location.excerpt()):
            parts.append(excerpt)
        if self.hint:
            parts.append(f"hint: {self.hint}")
        notes = self.notes
        if len(notes) > 6:
            # Blocks nested a hundred deep would give a hundred notes: the innermost
            # calls and the outermost say where.
            notes = [*notes[:3], f"... {len(notes) - 5} more calls ...", *notes[-2:]]
        parts.extend(f"note: {note}" for note in notes)
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render()


class CnncWarning(CnncError):
    """Something legal but probably not meant (an unused value); reported, never raised."""

    kind = "warning"


class ParseError(CnncError):
    """The program text does not follow the grammar."""


class LayerError(CnncError):
    """An unknown layer, an unknown attribute, or an attribute of the wrong type or value."""


class ShapeError(CnncError):
    """A layer cannot apply to the shape of its input."""


class WeightsError(CnncError):
    """A weights file is unreadable, or its tensors do not fit the network."""


class InputError(CnncError):
    """An input tensor does not fit the network."""


class ModelFileError(CnncError):
    """An ONNX file that cannot be read, checked or imported."""


class OutputError(CnncError):
    """An output file that cannot be written (a directory, a full disk, no permission)."""


class UsageError(CnncError):
    """A command-line option or API argument that cannot be honoured."""


class InternalError(CnncError):
    """A broken invariant inside cnnc (a bug in cnnc, not in the user's program)."""
