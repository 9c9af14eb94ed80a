"""Program text -> AST with lark's LALR parser (grammar/cnn.lark); syntax errors at their place."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import lark
from lark import Transformer, v_args

from cnnc.errors import Location, ParseError, Source

# ---- the AST -------------------------------------------------------------------------------


@dataclass
class Arg:
    """``value`` or ``name=value`` inside a call; values are int, float, str (a name) or tuple."""

    name: str | None
    value: Any
    loc: Location


@dataclass
class Call:
    """A layer applied in a chain: ``conv(6, kernel=5)`` or ``relu``."""

    name: str
    args: list[Arg]
    loc: Location
    name_loc: Location


@dataclass
class Link:
    """One step of a chain, optionally labelled: ``c1: conv(6, 5)``."""

    label: str | None
    call: Call
    loc: Location
    label_loc: Location | None = None


@dataclass
class Statement:
    """A chain of layers ``a -> b -> c`` that continues from the previous statement's value."""

    links: list[Link]
    loc: Location


@dataclass
class Network:
    """``network name(input: CxHxW) { statements }``."""

    name: str
    input_name: str
    input_shape: tuple[int, ...]
    statements: list[Statement]
    loc: Location
    shape_loc: Location


@dataclass
class Program:
    """A parsed source file."""

    source: Source
    networks: list[Network] = field(default_factory=list)


# ---- the parser ----------------------------------------------------------------------------


def grammar_text() -> str:
    """The grammar, from inside the installed package or, in a checkout, from grammar/."""
    packaged = resources.files("cnnc") / "grammar" / "cnn.lark"
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[2] / "grammar" / "cnn.lark").read_text(
        encoding="utf-8"
    )


@cache
def _lark() -> lark.Lark:
    # cache=True keeps the built LALR tables in the temp directory between runs.
    return lark.Lark(grammar_text(), parser="lalr", propagate_positions=True, cache=True)


def parse(text: str, filename: str = "<string>") -> Program:
    """Parse program text into an AST; a syntax error raises ParseError at its place."""
    source = Source(filename, text)
    try:
        tree = _lark().parse(text)
    except lark.exceptions.UnexpectedInput as e:
        raise _syntax_error(e, source) from None
    return ToAst(source).transform(tree)


def _loc(source: Source, meta) -> Location:
    return Location(source, meta.line, meta.column, meta.end_line, meta.end_column)


@v_args(meta=True)
class ToAst(Transformer):
    """Lark's parse tree -> AST dataclasses, each carrying its source span."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _tok(self, tok) -> Location:
        return Location(self.source, tok.line, tok.column, tok.end_line, tok.end_column)

    def start(self, meta, networks):
        return Program(self.source, list(networks))

    def network(self, meta, children):
        name, input_name, shape, *statements = children
        dims = tuple(int(d) for d in shape.split("x"))
        return Network(
            str(name), str(input_name), dims, statements, _loc(self.source, meta), self._tok(shape)
        )

    def statement(self, meta, links):
        return Statement(list(links), _loc(self.source, meta))

    def link(self, meta, children):
        if len(children) == 2:
            label, call = children
            return Link(str(label), call, _loc(self.source, meta), self._tok(label))
        return Link(None, children[0], _loc(self.source, meta))

    def call(self, meta, children):
        name, *args = children
        args = [a for a in args if a is not None]
        return Call(str(name), args, _loc(self.source, meta), self._tok(name))

    def arg(self, meta, children):
        return Arg(None, children[0], _loc(self.source, meta))

    def keyword_arg(self, meta, children):
        name, value = children
        return Arg(str(name), value, _loc(self.source, meta))

    def int_value(self, meta, children):
        return int(children[0])

    def float_value(self, meta, children):
        return float(children[0])

    def shape_value(self, meta, children):
        return tuple(int(d) for d in children[0].split("x"))

    def name_value(self, meta, children):
        return str(children[0])

    def tuple_value(self, meta, children):
        return tuple(children)


_TOKEN_WORDS = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "SHAPE": "a shape such as 3x32x32",
    "$END": "the end of the file",
}


_FOUND_WORDS = {"NAME": "name", "INT": "integer", "FLOAT": "number", "SHAPE": "shape"}


def _describe_terminal(name: str) -> str:
    if name in _TOKEN_WORDS:
        return _TOKEN_WORDS[name]
    try:
        term = _lark().get_terminal(name)
    except KeyError:
        return name
    return f"'{term.pattern.value}'" if term.pattern.type == "str" else name


def _expected(names) -> str:
    words = sorted({_describe_terminal(n) for n in names})
    if len(words) > 1:
        return ", ".join(words[:-1]) + " or " + words[-1]
    return words[0] if words else "something else"


def _syntax_error(e, source: Source) -> ParseError:
    if isinstance(e, lark.exceptions.UnexpectedCharacters):
        char = source.text[e.pos_in_stream] if e.pos_in_stream < len(source.text) else ""
        loc = Location(source, e.line, e.column, e.line, e.column + 1)
        return ParseError(
            f"unexpected character {char!r}",
            loc,
            hint=f"expected {_expected(e.allowed)}" if e.allowed else None,
        )
    token = getattr(e, "token", None)
    if token is None or token.type == "$END":
        lines = source.text.splitlines() or [""]
        loc = Location(source, len(lines), len(lines[-1]) + 1)
        return ParseError(
            f"unexpected end of file; expected {_expected(e.expected)}",
            loc,
            hint="a '{' may be missing its '}'" if "RBRACE" in e.expected else None,
        )
    loc = Location(source, token.line, token.column, token.end_line, token.end_column)
    kind = _FOUND_WORDS.get(token.type)
    found = f"{kind} '{token}'" if kind else f"'{token}'"
    hint = None
    if token.type == "NAME" and "COLON" in e.expected:
        hint = "the input is declared as name: CxHxW, for example image: 3x32x32"
    return ParseError(f"unexpected {found}; expected {_expected(e.expected)}", loc, hint)
