"""Program text -> AST with lark's LALR parser (grammar/cnn.lark); syntax errors at their place."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import lark

from cnnc.errors import Location, ParseError, Source

# ---- the AST -------------------------------------------------------------------------------


@dataclass
class Expr:
    """An argument expression; evaluated when the program is lowered."""

    loc: Location


@dataclass
class Literal(Expr):
    """An integer, a number or a tuple of integers written as a shape (3x5)."""

    value: Any


@dataclass
class Name(Expr):
    """A name: a block parameter, a value, or a word such as same, valid, true, false."""

    id: str


@dataclass
class BinOp(Expr):
    """``left op right`` with op one of + - * //."""

    op: str
    left: Expr
    right: Expr


@dataclass
class Neg(Expr):
    """``-operand``."""

    operand: Expr


@dataclass
class Member(Expr):
    """``value.size``: a size of a value (``in.channels``, ``x.height``)."""

    value: str
    size: str
    value_loc: Location


@dataclass
class TupleExpr(Expr):
    """``(a, b, ...)``."""

    items: list[Expr]


@dataclass
class Arg:
    """``expr`` or ``name=expr`` inside a call."""

    name: str | None
    value: Expr
    loc: Location


@dataclass
class Call:
    """A layer or block applied in a chain: ``conv(6, kernel=5)``, ``relu``, ``basic(64)``."""

    name: str
    args: list[Arg]
    loc: Location
    name_loc: Location
    parens: bool = False


@dataclass
class Link:
    """One step of a chain, optionally labelled and repeated: ``layer1: basic(64) * 2``;
    or a sequence ``layer2: [basic_down(128), basic(128)]`` (``call`` is None, ``steps``
    holds the unlabelled steps)."""

    label: str | None
    call: Call | None
    loc: Location
    label_loc: Location | None = None
    repeat: Expr | None = None
    steps: list[Link] | None = None

    @property
    def bare_name(self) -> str | None:
        """The name, if this step is a bare name (which may refer to a value)."""
        if self.call is None or self.label is not None or self.repeat is not None:
            return None
        return None if self.call.parens else self.call.name


@dataclass
class Statement:
    """A chain ``a -> b -> c``, optionally bound to a name: ``y = a -> b``."""

    links: list[Link]
    loc: Location
    # ``y = ...`` binds one name; ``a, b = ...`` the values of a layer that gives several.
    bindings: list[tuple[str, Location]] = field(default_factory=list)


@dataclass
class Param:
    """A block parameter, with its default."""

    name: str
    default: Expr | None
    loc: Location


@dataclass
class Block:
    """``block name(params) { statements }``: a reusable sub-network whose input is ``in``."""

    name: str
    params: list[Param]
    statements: list[Statement]
    loc: Location
    name_loc: Location


@dataclass
class NetworkInput:
    """``name: CxHxW`` in a network's heading."""

    name: str
    shape: tuple[int, ...]
    loc: Location
    shape_loc: Location


@dataclass
class Network:
    """``network name(input: CxHxW, ...) -> (output, ...) { statements }``; without
    ``outputs`` the last statement's value is the one output."""

    name: str
    inputs: list[NetworkInput]
    statements: list[Statement]
    loc: Location
    outputs: list[tuple[str, Location]] | None = None

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.inputs[0].shape


@dataclass
class Program:
    """A parsed source file."""

    source: Source
    networks: list[Network] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)


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


class ToAst:
    """Lark's parse tree -> AST dataclasses, each carrying its source span.

    A method per rule (or alias) takes the node's meta and its converted children. This
    walks the tree itself rather than through lark's Transformer, whose dispatch costs
    several times the work of each method on a 100,000-statement program.
    """

    def __init__(self, source: Source):
        self.source = source
        self._methods: dict[str, Any] = {}

    def transform(self, tree: lark.Tree) -> Any:
        method = self._methods.get(tree.data)
        if method is None:
            method = self._methods[tree.data] = getattr(self, tree.data)
        return method(
            tree.meta,
            [self.transform(c) if isinstance(c, lark.Tree) else c for c in tree.children],
        )

    def _loc(self, meta) -> Location:
        return _loc(self.source, meta)

    def _tok(self, tok) -> Location:
        return Location(self.source, tok.line, tok.column, tok.end_line, tok.end_column)

    def start(self, meta, definitions):
        program = Program(self.source)
        for d in definitions:
            (program.networks if isinstance(d, Network) else program.blocks).append(d)
        return program

    def network(self, meta, children):
        name, *rest = children
        inputs = [c for c in rest if isinstance(c, NetworkInput)]
        outputs = next((c for c in rest if isinstance(c, list)), None)
        statements = [c for c in rest if isinstance(c, Statement)]
        return Network(str(name), inputs, statements, self._loc(meta), outputs)

    def net_input(self, meta, children):
        name, shape = children
        dims = tuple(int(d) for d in shape.split("x"))
        return NetworkInput(str(name), dims, self._loc(meta), self._tok(shape))

    def net_outputs(self, meta, names):
        return [(str(n), self._tok(n)) for n in names]

    def block(self, meta, children):
        name, *rest = children
        params = [c for c in rest if isinstance(c, Param)]
        statements = [c for c in rest if isinstance(c, Statement)]
        return Block(str(name), params, statements, self._loc(meta), self._tok(name))

    def param(self, meta, children):
        name, default = children
        return Param(str(name), default, self._tok(name))

    def binding(self, meta, children):
        *names, chain = children
        return Statement(chain.links, self._loc(meta), [(str(n), self._tok(n)) for n in names])

    def expression(self, meta, children):
        return children[0]

    def chain(self, meta, links):
        return Statement(list(links), self._loc(meta))

    def link(self, meta, children):
        path, call, repeat = children
        label = path[0] if path else None
        return Link(label, call, self._loc(meta), path[1] if path else None, repeat)

    def sequence(self, meta, children):
        path, *steps = children
        return Link(
            path[0] if path else None, None, self._loc(meta), path[1] if path else None, steps=steps
        )

    def step(self, meta, children):
        call, repeat = children
        return Link(None, call, self._loc(meta), repeat=repeat)

    def path(self, meta, parts):
        return ".".join(str(p) for p in parts), self._loc(meta)

    def bare_call(self, meta, children):
        (name,) = children
        return Call(str(name), [], self._loc(meta), self._tok(name))

    def call(self, meta, children):
        name, *args = children
        args = [a for a in args if a is not None]
        return Call(str(name), args, self._loc(meta), self._tok(name), parens=True)

    def arg(self, meta, children):
        return Arg(None, children[0], self._loc(meta))

    def keyword_arg(self, meta, children):
        name, value = children
        return Arg(str(name), value, self._loc(meta))

    def int_value(self, meta, children):
        return Literal(self._loc(meta), int(children[0]))

    def float_value(self, meta, children):
        return Literal(self._loc(meta), float(children[0]))

    def shape_value(self, meta, children):
        return Literal(self._loc(meta), tuple(int(d) for d in children[0].split("x")))

    def name_value(self, meta, children):
        return Name(self._loc(meta), str(children[0]))

    def member_value(self, meta, children):
        value, size = children
        return Member(self._loc(meta), str(value), str(size), self._tok(value))

    def tuple_value(self, meta, children):
        return TupleExpr(self._loc(meta), list(children))

    def neg(self, meta, children):
        return Neg(self._loc(meta), children[0])

    def _binop(op):
        def build(self, meta, children):
            return BinOp(self._loc(meta), op, children[0], children[1])

        return build

    add = _binop("+")
    sub = _binop("-")
    mul = _binop("*")
    floordiv = _binop("//")


_TOKEN_WORDS = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "SHAPE": "a shape such as 3x32x32",
    "HYPHENATED": "a label such as block1-0",
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


# Operators that may continue almost any expression; listing them hides what is missing.
_OPERATORS = {"'+'", "'-'", "'*'", "'//'"}


def _expected(names) -> str:
    if "NAME" in names:
        # Wherever a hyphenated label part may come, a name may too: it says enough.
        names = [n for n in names if n != "HYPHENATED"]
    words = sorted({_describe_terminal(n) for n in names})
    if set(words) - _OPERATORS:
        words = [w for w in words if w not in _OPERATORS]
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
