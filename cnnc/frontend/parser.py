"""Program text -> AST with lark's LALR parser (grammar/cnn.lark); syntax errors at their place."""

from __future__ import annotations

import contextvars
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import lark

from cnnc import limits
from cnnc.errors import CnncError, InternalError, Location, ParseError, Source

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


class _Node:
    """What a rule of the grammar reduced to while parsing: its value (a piece of the AST,
    or a list or tuple that its parent rule takes apart), the span of the text it covers
    (the attributes are named as a token's, so that tokens and nodes give their spans
    alike), and how deep the expression it is nests."""

    __slots__ = ("column", "depth", "end_column", "end_line", "line", "value")

    def __init__(self, value, line, column, end_line, end_column, depth=1):
        self.value, self.depth = value, depth
        self.line, self.column, self.end_line, self.end_column = line, column, end_line, end_column


@dataclass
class _Parsing:
    """The state of one parse: the source, the span of the rule being reduced, how many
    arguments the call being parsed has so far, how deep the parentheses open at the token
    being lexed nest, and the first error found in a literal (reported once the whole
    text has parsed: a syntax error anywhere comes first)."""

    source: Source
    span: tuple | None = None
    arguments: int = 0
    parens: int = 0  # the parentheses open at the token being lexed
    error: CnncError | None = None


def _span(node) -> tuple[int, int, int, int]:
    """The span of a token or of a reduced rule (:class:`_Node`)."""
    return node.line, node.column, node.end_line, node.end_column


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


def _cache_file() -> str | bool:
    """Where lark keeps the built LALR tables between runs (about 40 ms of every start): a
    file in the user's own cache folder (``$XDG_CACHE_HOME/cnnc`` or ``~/.cache/cnnc``),
    or no cache (False) when that folder cannot be made or is not private. lark unpickles
    the file it is given, so it must be one that no one else can write; lark's own
    default (``cache=True``) is a predictable name in the shared temp directory, which
    another user could create first. (lark checks that the file was built from this
    grammar, these options and this lark before it uses it.)"""
    import os
    import stat

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "cnnc")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return False
    python = "".join(map(str, sys.version_info[:2]))
    return os.path.join(folder, f"grammar-py{python}-lark{lark.__version__}.cache")


@cache
def _lark() -> lark.Lark:
    parser = lark.Lark(
        grammar_text(),
        parser="lalr",
        cache=_cache_file(),
        lexer_callbacks={"LPAR": _open_paren, "RPAR": _close_paren},
    )
    # Each rule reduces straight to its piece of the AST (see ToAst): no parse tree is
    # built, walked and thrown away, which was two thirds of the time of a parse.
    parser.parser.parser.parser.callbacks = _callbacks(parser)
    return parser


def _callbacks(parser: lark.Lark) -> dict:
    """The parser's callback of every rule: lark's own shaping of the rule's children
    (anonymous tokens left out, None for an optional part that is absent, a ``?rule`` of
    one child replaced by that child), then the method of :class:`ToAst` named after the
    rule, given the span of the rule's text. The span is the one lark's
    ``propagate_positions`` gives: from the start of the first of the rule's symbols
    (anonymous tokens included) to the end of the last."""
    from lark.parse_tree_builder import ParseTreeBuilder

    builder = ParseTreeBuilder(
        parser.rules, lark.Tree, maybe_placeholders=parser.options.maybe_placeholders
    )
    callbacks = {}
    for rule, shaping in builder.rule_builders:
        name = rule.alias or rule.options.template_source or rule.origin.name
        # lark's own rules for repetitions such as ("," arg)* give their children to the
        # rule that holds them; a ``?rule`` of one child (expr: product) is that child.
        method = getattr(ToAst, name, _no_method)
        reduce = _group if name.startswith("_") else _reducer(method)
        for wrapper in shaping:
            reduce = wrapper(reduce)
        callbacks[rule] = _spanned(reduce)
    return callbacks


def _reducer(method):
    def reduce(children):
        parsing = _PARSING.get()
        return method(parsing, parsing.span, children)

    return reduce


class _Group(_Node):
    """The children of one of lark's rules for repetitions, which its parent takes in."""

    __slots__ = ("children",)


def _group(children):
    group = _Group(None, *_PARSING.get().span)
    group.children = children
    return group


def _no_method(parsing, span, children):
    raise InternalError(f"the grammar has a rule that ToAst has no method for ({children})")


def _spanned(reduce):
    def callback(children):
        if children:
            first, last = children[0], children[-1]
            _PARSING.get().span = (first.line, first.column, last.end_line, last.end_column)
        else:
            _PARSING.get().span = None
        return reduce(children)

    return callback


def parse(text: str, filename: str = "<string>") -> Program:
    """Parse program text into an AST; a syntax error raises ParseError at its place.

    Nothing here recurses on the input (lark's LALR parser keeps its own stack, and the
    AST is built bottom-up as the rules are reduced), so no program, however nested,
    reaches Python's recursion limit; the limits ``program_bytes`` and ``expr_depth``
    and the 64-bit range of literals are checked here."""
    source = Source(filename, text)
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size > limits.current().program_bytes:
        raise limits.exceeded(
            ParseError, "program_bytes", "the program text is", size, filename, unit="bytes"
        )
    parsing = _Parsing(source)
    token = _PARSING.set(parsing)
    try:
        root = _lark().parse(text)
    except lark.exceptions.UnexpectedInput as e:
        raise _syntax_error(e, source) from None
    finally:
        _PARSING.reset(token)
    if parsing.error is not None:
        raise parsing.error
    return root.value


def _loc(source: Source, span) -> Location:
    return Location(source, *span)


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


def _values(children) -> list:
    """The children of a rule as the AST wants them: reduced rules by their values."""
    return [c.value if type(c) is _Node else c for c in children]


class ToAst:
    """How each rule of the grammar (or alias) becomes its piece of the AST, as lark's
    LALR parser reduces it: a method per rule takes the parse's state, the span of the
    rule's text and its children (tokens, the :class:`_Node` of each rule reduced, None
    for an optional part that is absent) and returns the rule's :class:`_Node`.

    The limits on expressions are checked here too, so that a program such as
    ``1+1+...`` with 100,000 terms is refused at the 101st, and ``add(y, y, ...)`` of
    100,000 operands at the 10,001st, not after the whole of it is parsed. (Arguments
    never contain calls, so the arguments reduced since the last call belong to the next
    call.) A literal that is out of range is remembered and reported once the whole text
    has parsed, as a syntax error anywhere in the text comes first.
    """

    def _literal(build):
        def reduce(parsing, span, children):
            try:
                value = build(parsing.source, span, children)
            except CnncError as e:
                if parsing.error is None:
                    parsing.error = e
                value = Literal(Location(parsing.source, *span), 0)
            return _Node(value, *span)

        return reduce

    def _plain(build):
        def reduce(parsing, span, children):
            return _Node(build(parsing.source, span, _values(children)), *span)

        return reduce

    def start(parsing, span, children):
        program = Program(parsing.source)
        for d in _values(children):
            (program.networks if isinstance(d, Network) else program.blocks).append(d)
        return _Node(program, *(span or (None, None, None, None)))

    @_plain
    def network(source, span, children):
        name, *rest = children
        inputs = [c for c in rest if isinstance(c, NetworkInput)]
        outputs = next((c for c in rest if isinstance(c, list)), None)
        statements = [c for c in rest if isinstance(c, Statement)]
        return Network(str(name), inputs, statements, _loc(source, span), outputs)

    @_literal
    def net_input(source, span, children):
        name, shape, options = _values(children)
        dims = tuple(_integer(d, _tok(source, shape)) for d in shape.split("x"))
        return NetworkInput(str(name), dims, _loc(source, span), _tok(source, shape), options or [])

    @_plain
    def input_options(source, span, options):
        return list(options)

    @_plain
    def input_option(source, span, children):
        name, value = children
        return Arg(str(name), value, _loc(source, span))

    @_plain
    def option_word(source, span, children):
        return Name(_loc(source, span), str(children[0]))

    @_literal
    def option_number(source, span, children):
        sign, number = children
        loc = _loc(source, span)
        value = float(number) if number.type == "FLOAT" else _integer(number, loc)
        return Literal(loc, -value if sign else value)

    @_plain
    def option_tuple(source, span, children):
        return TupleExpr(_loc(source, span), list(children))

    @_plain
    def net_outputs(source, span, names):
        return [(str(n), _tok(source, n)) for n in names]

    @_plain
    def block(source, span, children):
        name, *rest = children
        params = [c for c in rest if isinstance(c, Param)]
        statements = [c for c in rest if isinstance(c, Statement)]
        return Block(str(name), params, statements, _loc(source, span), _tok(source, name))

    @_plain
    def param(source, span, children):
        name, default = children
        return Param(str(name), default, _tok(source, name))

    @_plain
    def binding(source, span, children):
        *names, chain = children
        return Statement(
            chain.links, _loc(source, span), [(str(n), _tok(source, n)) for n in names]
        )

    @_plain
    def expression(source, span, children):
        return children[0]

    @_plain
    def chain(source, span, links):
        return Statement(list(links), _loc(source, span))

    @_plain
    def link(source, span, children):
        path, call, repeat = children
        label = path[0] if path else None
        return Link(label, call, _loc(source, span), path[1] if path else None, repeat)

    @_plain
    def sequence(source, span, children):
        path, *steps = children
        return Link(
            path[0] if path else None,
            None,
            _loc(source, span),
            path[1] if path else None,
            steps=steps,
        )

    @_plain
    def step(source, span, children):
        call, repeat = children
        return Link(None, call, _loc(source, span), repeat=repeat)

    @_plain
    def path(source, span, parts):
        return ".".join(str(p) for p in parts), _loc(source, span)

    @_plain
    def bare_call(source, span, children):
        (name,) = children
        return Call(str(name), [], _loc(source, span), _tok(source, name))

    def call(parsing, span, children):
        parsing.arguments = 0
        name, *args = _values(children)
        args = [a for a in args if a is not None]
        loc = _loc(parsing.source, span)
        return _Node(Call(str(name), args, loc, _tok(parsing.source, name), parens=True), *span)

    def _argument(build):
        def reduce(parsing, span, children):
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
            return _Node(build(parsing.source, span, _values(children)), *span)

        return reduce

    @_argument
    def arg(source, span, children):
        return Arg(None, children[0], _loc(source, span))

    @_argument
    def keyword_arg(source, span, children):
        name, value = children
        return Arg(str(name), value, _loc(source, span))

    @_literal
    def int_value(source, span, children):
        loc = _loc(source, span)
        return Literal(loc, _integer(children[0], loc))

    @_literal
    def float_value(source, span, children):
        value = float(children[0])
        if value == float("inf"):
            raise ParseError(
                f"number {str(children[0])[:30]} is too large for a 64-bit float",
                _loc(source, span),
                hint="numbers in a program are at most about 1.8e308",
            )
        return Literal(_loc(source, span), value)

    @_literal
    def shape_value(source, span, children):
        loc = _loc(source, span)
        return Literal(loc, tuple(_integer(d, loc) for d in children[0].split("x")))

    @_plain
    def name_value(source, span, children):
        return Name(_loc(source, span), str(children[0]))

    @_plain
    def member_value(source, span, children):
        value, size = children
        return Member(_loc(source, span), str(value), str(size), _tok(source, value))

    def _nested(build):
        def reduce(parsing, span, children):
            depth = 1 + max((getattr(c, "depth", 1) for c in children), default=0)
            if depth > limits.current().expr_depth:
                first, last = _span(children[0]), _span(children[-1])
                loc = Location(parsing.source, first[0], first[1], last[2], last[3])
                raise limits.exceeded(
                    ParseError,
                    "expr_depth",
                    "this expression is nested",
                    depth,
                    loc,
                    unit=" levels deep",
                )
            return _Node(build(parsing.source, span, _values(children)), *span, depth)

        return reduce

    @_nested
    def tuple_value(source, span, children):
        return TupleExpr(_loc(source, span), list(children))

    def paren(parsing, span, children):
        # Parentheses add no level of evaluation: (a + b) is as deep as a + b, and its value
        # is that of a + b; its span takes the parentheses in. (How deep parentheses nest
        # is bounded as the lexer reads them: _open_paren.)
        (child,) = children
        return _Node(child.value, *span, child.depth)

    @_nested
    def neg(source, span, children):
        return Neg(_loc(source, span), children[0])

    def _binop(op):
        def build(source, span, children):
            return BinOp(_loc(source, span), op, children[0], children[1])

        return build

    add = _nested(_binop("+"))
    sub = _nested(_binop("-"))
    mul = _nested(_binop("*"))
    floordiv = _nested(_binop("//"))


def _tok(source: Source, tok) -> Location:
    return Location(source, tok.line, tok.column, tok.end_line, tok.end_column)


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
