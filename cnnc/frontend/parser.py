"""Program text -> AST with lark's LALR parser (grammar/cnn.lark); syntax errors at their place."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import lark

from cnnc import limits
from cnnc.errors import CnncError, Location, ParseError, Source

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
    # ``[normalize=imagenet]`` after the shape: how an image becomes this input.
    options: list[Arg] = field(default_factory=list)


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


class _Nested(lark.Tree):
    """A parse tree node of an expression operator, with its nesting depth."""

    __slots__ = ("depth",)


@dataclass
class _Parsing:
    """What the limits checked during a parse need: the source, and how many arguments
    the call being parsed has so far."""

    source: Source
    arguments: int = 0
    parens: int = 0  # the parentheses open at the token being lexed


class _Limits(lark.Transformer):
    """Counts the nesting of expressions and the arguments of calls while lark's LALR
    parser reduces them, so that a program such as ``1+1+...`` with 100,000 terms is
    refused at the 101st, and ``add(y, y, ...)`` of 100,000 operands at the 10,001st, not
    after the whole of it is parsed. (Arguments never contain calls, so the arguments
    reduced since the last call belong to the next call.)"""

    def _argument(data):
        def build(self, children):
            parsing = _PARSING.get()
            parsing.arguments += 1
            if parsing.arguments > limits.current().operands:
                first, last = _span(children[0]), _span(children[-1])
                raise limits.exceeded(
                    ParseError,
                    "operands",
                    "this call has at least",
                    parsing.arguments,
                    Location(parsing.source, first[0], first[1], last[2], last[3]),
                    unit=" arguments",
                )
            return lark.Tree(data, children)

        return build

    arg = _argument("arg")
    keyword_arg = _argument("keyword_arg")

    def call(self, children):
        _PARSING.get().arguments = 0
        return lark.Tree("call", children)

    def _nested(data):
        def build(self, children):
            depth = 1 + max((getattr(c, "depth", 1) for c in children), default=0)
            if depth > limits.current().expr_depth:
                first, last = _span(children[0]), _span(children[-1])
                loc = Location(_PARSING.get().source, first[0], first[1], last[2], last[3])
                raise limits.exceeded(
                    ParseError,
                    "expr_depth",
                    "this expression is nested",
                    depth,
                    loc,
                    unit=" levels deep",
                )
            tree = _Nested(data, children)
            tree.depth = depth
            return tree

        return build

    add = _nested("add")
    sub = _nested("sub")
    mul = _nested("mul")
    floordiv = _nested("floordiv")
    neg = _nested("neg")
    tuple_value = _nested("tuple_value")

    def paren(self, children):
        # Parentheses add no level of evaluation: (a + b) is as deep as a + b. (How deep
        # parentheses nest is bounded as the lexer reads them: _open_paren.)
        (child,) = children
        tree = _Nested("paren", children)
        tree.depth = getattr(child, "depth", 1)
        return tree


def _span(node) -> tuple[int, int, int, int]:
    if isinstance(node, lark.Token):
        return node.line, node.column, node.end_line, node.end_column
    meta = node.meta
    return meta.line, meta.column, meta.end_line, meta.end_column


_PARSING: contextvars.ContextVar[_Parsing | None] = contextvars.ContextVar(
    "cnnc_parsing", default=None
)


def _open_paren(token: lark.Token) -> lark.Token:
    """Count parentheses as the lexer reads them, so that ((((... 100,000 deep is refused
    at the 102nd "(" rather than after all are read (a call's own parenthesis is one
    level more than its arguments' expressions may have)."""
    parsing = _PARSING.get()
    parsing.parens += 1
    if parsing.parens > limits.current().expr_depth + 1:
        raise limits.exceeded(
            ParseError,
            "expr_depth",
            "parentheses are nested",
            parsing.parens - 1,
            Location(parsing.source, token.line, token.column, token.end_line, token.end_column),
            unit=" levels deep",
        )
    return token


def _close_paren(token: lark.Token) -> lark.Token:
    _PARSING.get().parens -= 1
    return token


@cache
def _lark() -> lark.Lark:
    # cache=True keeps the built LALR tables in the temp directory between runs.
    return lark.Lark(
        grammar_text(),
        parser="lalr",
        propagate_positions=True,
        cache=True,
        transformer=_Limits(),
        lexer_callbacks={"LPAR": _open_paren, "RPAR": _close_paren},
    )


def parse(text: str, filename: str = "<string>") -> Program:
    """Parse program text into an AST; a syntax error raises ParseError at its place.

    Nothing here recurses on the input (lark's LALR parser keeps its own stack, and the
    AST is built bottom-up without recursion), so no program, however nested, reaches
    Python's recursion limit; the limits ``program_bytes`` and ``expr_depth`` and the
    64-bit range of literals are checked here."""
    source = Source(filename, text)
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size > limits.current().program_bytes:
        raise limits.exceeded(
            ParseError, "program_bytes", "the program text is", size, filename, unit="bytes"
        )
    token = _PARSING.set(_Parsing(source))
    try:
        tree = _lark().parse(text)
    except lark.exceptions.UnexpectedInput as e:
        raise _syntax_error(e, source) from None
    finally:
        _PARSING.reset(token)
    try:
        return ToAst(source).transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, CnncError):
            raise e.orig_exc from None
        raise


def _loc(source: Source, meta) -> Location:
    return Location(source, meta.line, meta.column, meta.end_line, meta.end_column)


def _integer(text: str, loc: Location) -> int:
    """An integer literal, refused before conversion when it cannot fit an int64 (so that
    Python's limit on converting long digit strings never comes into play)."""
    digits = text.lstrip("0") or "0"
    if len(digits) > limits.INT64_DIGITS or int(digits) > limits.INT64_MAX:
        shown = digits if len(digits) <= 30 else f"{digits[:20]}... ({len(digits):,} digits)"
        raise ParseError(
            f"integer {shown} does not fit in 64 bits",
            loc,
            hint="integers in a program are at most 2**63-1 = 9223372036854775807 "
            "(a hard limit: ONNX and NumPy hold sizes in int64)",
        )
    return int(digits)


class ToAst:
    """Lark's parse tree -> AST dataclasses, each carrying its source span.

    A method per rule (or alias) takes the node's meta and its converted children. This
    walks the tree itself rather than through lark's Transformer, whose dispatch costs
    several times the work of each method on a 100,000-statement program.
    """

    def __init__(self, source: Source):
        self.source = source
        self._methods: dict[str, Any] = {}

    def transform(self, root: lark.Tree) -> Any:
        # Without recursion: list the trees parents first, then convert them in reverse,
        # so that every tree's children are converted before it (an expression nested as
        # deep as a lifted expr_depth allows never meets Python's recursion limit).
        order, stack = [], [root]
        while stack:
            tree = stack.pop()
            order.append(tree)
            stack.extend(c for c in tree.children if isinstance(c, lark.Tree))
        methods, done = self._methods, {}
        for tree in reversed(order):
            method = methods.get(tree.data)
            if method is None:
                method = methods[tree.data] = getattr(self, tree.data)
            done[id(tree)] = method(
                tree.meta,
                [done.pop(id(c)) if isinstance(c, lark.Tree) else c for c in tree.children],
            )
        return done[id(root)]

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
        name, shape, options = children
        dims = tuple(_integer(d, self._tok(shape)) for d in shape.split("x"))
        return NetworkInput(str(name), dims, self._loc(meta), self._tok(shape), options or [])

    def input_options(self, meta, options):
        return list(options)

    def input_option(self, meta, children):
        name, value = children
        return Arg(str(name), value, self._loc(meta))

    def option_word(self, meta, children):
        return Name(self._loc(meta), str(children[0]))

    def option_number(self, meta, children):
        sign, number = children
        loc = self._loc(meta)
        value = float(number) if number.type == "FLOAT" else _integer(number, loc)
        return Literal(loc, -value if sign else value)

    def option_tuple(self, meta, children):
        return TupleExpr(self._loc(meta), list(children))

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
        return Literal(self._loc(meta), _integer(children[0], self._loc(meta)))

    def float_value(self, meta, children):
        value = float(children[0])
        if value == float("inf"):
            raise ParseError(
                f"number {str(children[0])[:30]} is too large for a 64-bit float",
                self._loc(meta),
                hint="numbers in a program are at most about 1.8e308",
            )
        return Literal(self._loc(meta), value)

    def shape_value(self, meta, children):
        loc = self._loc(meta)
        return Literal(loc, tuple(_integer(d, loc) for d in children[0].split("x")))

    def name_value(self, meta, children):
        return Name(self._loc(meta), str(children[0]))

    def member_value(self, meta, children):
        value, size = children
        return Member(self._loc(meta), str(value), str(size), self._tok(value))

    def tuple_value(self, meta, children):
        return TupleExpr(self._loc(meta), list(children))

    def paren(self, meta, children):
        return children[0]

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
