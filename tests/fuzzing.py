"""A fuzzer for cnnc: generated valid-looking programs and mutated examples, run through the
whole pipeline, each input classified as accepted, a clear error, another exception or slow.

Run it as a command for the long run (it prints the counts and writes the failing inputs):

    python tests/fuzzing.py --count 50000 --seed 1 --jobs 2

The suite's quick run (tests/test_fuzz.py) imports :func:`fuzz` with a fixed seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import random
import re
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__" and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: this checkout's cnnc

from cnnc import weights as weights_mod  # noqa: E402
from cnnc.api import Model, optimize  # noqa: E402
from cnnc.errors import CnncError, InternalError, Location  # noqa: E402
from cnnc.frontend.lower import lower  # noqa: E402
from cnnc.frontend.parser import parse  # noqa: E402
from cnnc.ops import all_layers  # noqa: E402

FILENAME = "fuzz.cnn"
EXAMPLES = sorted((ROOT / "examples").glob("*.cnn"))

# The interpreter and the weights run only on networks under these sizes (per batch item),
# so that every input takes milliseconds; larger ones are lowered, optimized at -O1,
# dumped and summarised without weights.
SMALL_PARAMS = 300_000
SMALL_ACTIVATIONS = 300_000

ACTIVATIONS = ["relu", "sigmoid", "tanh", "silu", "hardswish", "mish", "relu6"]
LAYERS = sorted(all_layers())
ATTR_NAMES = sorted({a.name for layer in all_layers().values() for a in layer.attrs})
JUNK_NAMES = ["foo", "x1", "in", "true", "same", "N", "network", "_", "relu_", "Conv", "bnn"]


# ---- the generator of valid-looking programs -------------------------------------------------


@dataclasses.dataclass
class Settings:
    """How wild the generator and the mutator are.

    ``bombs`` allows resource bombs: repetition counts in the millions, sizes past int64,
    deep nesting, many operands (what tests/test_limits.py covers one by one). ``mistakes``
    is the chance that a layer gets a deliberately wrong argument.
    """

    bombs: bool = False
    mistakes: float = 0.05
    bomb_rate: float = 0.02  # the chance of a bomb at each place that can hold one


BOMB_INTS = [
    str(2**31),
    str(10**30),
    str(2**63),
    str(2**64 - 1),
    str(10**12),
    "9" * 4301,
    "-" * 485 + "1",
]


def _bomb(rng: random.Random, settings: Settings) -> bool:
    return settings.bombs and rng.random() < settings.bomb_rate


def _shape_text(dims: tuple[int, ...]) -> str:
    return "x".join(map(str, dims))


class _Gen:
    """One program: a random walk over layers that keeps track of the current shape, so that
    most choices fit and the rest fail in lowering and shape inference, not in the parser."""

    def __init__(self, rng: random.Random, settings: Settings):
        self.rng = rng
        self.s = settings
        self.lines: list[str] = []
        self.values: dict[str, tuple[int, ...]] = {}  # bound names and their shapes
        self.labels: set[str] = set()
        self.counter = 0

    # -- small values

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def wild_int(self) -> str:
        """An integer literal that is rarely what a layer wants."""
        r = self.rng
        if _bomb(r, self.s):
            return r.choice([*BOMB_INTS, "+".join(["1"] * 100_000)])
        choices = ["0", "-1", "1", "2", str(r.randint(3, 300)), "-(2)", "1 + 1", "7 // 2", "3 * 0"]
        return r.choice([*choices, str(r.randint(1000, 70000))])

    def wild_value(self) -> str:
        r = self.rng
        return r.choice(
            [
                self.wild_int(),
                "1.5",
                "0.0",
                "1e30",
                "(1, 2)",
                "(1, 2, 3)",
                "(2, 2, 2, 2, 2)",
                "(0, 0)",
                "same",
                "valid",
                "true",
                "false",
                r.choice(JUNK_NAMES),
                r.choice(LAYERS),
                "in.channels",
                "in.height",
                "in.bogus",
                "3x3",
                "x",
                r.choice(list(self.values) or ["y"]),
            ]
        )

    def fresh(self, stem: str = "v") -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    # -- layers: each returns (text, new shape or None when unsure)

    def layer(self, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...] | None]:
        r = self.rng
        if self.chance(self.s.mistakes):
            return self.mistaken_layer(), None
        c = shape[0]
        spatial = shape[1:]
        options = ["act", "act", "conv", "conv", "bn", "pool", "fc", "misc", "norm", "tensor"]
        if not spatial:
            options = ["act", "act", "fc", "fc", "bn", "misc", "linear"]
        kind = r.choice(options)
        if kind == "act":
            return self.activation(c), shape
        if kind == "conv":
            return self.conv(shape)
        if kind == "bn":
            return r.choice(["bn", "bn(eps=0.001)", "affine", "scale"]), shape
        if kind == "pool":
            return self.pool(shape)
        if kind == "fc":
            out = r.choice([1, 2, 10, r.randint(1, 64)])
            bias = r.choice(["", "", ", bias=false"])
            return f"fc({out}{bias})", (out,)
        if kind == "linear":
            out = r.randint(1, 32)
            return f"linear({out})", (out, *spatial)
        if kind == "norm":
            return self.norm(shape)
        if kind == "tensor":
            return self.tensor(shape)
        return self.misc(shape)

    def activation(self, c: int) -> str:
        r = self.rng
        return r.choice(
            [
                *ACTIVATIONS,
                f"hardsigmoid(alpha={r.choice(['0.2', '1 // 6'])}, beta=0.5)",
                f"gelu(approximate={r.choice(['none', 'tanh'])})",
                f"elu({r.choice(['1.0', '0.5', '2'])})",
                f"softplus(beta={r.choice(['1.0', '2', '0.5'])})",
                f"leaky_relu({r.choice(['0.01', '0.2', '0'])})",
                f"clip({r.choice(['0', '-1', '-0.5'])}, {r.choice(['6', '1', '0.5'])})",
                "softmax",
                "softmax(axis=1)",
                f"prelu({r.choice([1, c])})",
                "prelu(init=0.1)",
                "dropout",
                "dropout(0.2)",
                "drop_path(p=0.2)",
            ]
        )

    def window(self, size: int, max_kernel: int = 7) -> tuple[int, int, int, int]:
        """A kernel, stride, pad and dilation that fit an axis of ``size`` (mostly)."""
        r = self.rng
        k = r.randint(1, max(1, min(max_kernel, size)))
        s = r.choice([1, 1, 1, 2, 2, 3])
        p = r.choice([0, 0, k // 2, 1]) if k > 1 else 0
        d = 1 if self.chance(0.85) else 2
        if d * (k - 1) + 1 > size + 2 * p:
            d = 1
        return k, s, p, d

    def conv(self, shape):
        r = self.rng
        c, spatial = shape[0], shape[1:]
        out = r.choice([1, 2, 4, 8, 16, c, r.randint(1, 32)])
        k, s, p, d = self.window(min(spatial))
        args = [str(out), str(k) if self.chance(0.7) else f"kernel={k}"]
        if s != 1:
            args.append(f"stride={s}")
        if p:
            args.append(f"pad={p}" if self.chance(0.8) else "pad=same")
            if args[-1] == "pad=same":
                p = None
        if d != 1:
            args.append(f"dilation={d}")
        groups = 1
        if self.chance(0.15):
            groups = r.choice([g for g in (1, 2, 4, c) if c % g == 0 and out % g == 0] or [1])
            args.append(f"groups={groups}")
        if self.chance(0.2):
            args.append("bias=false")
        if len(spatial) == 2 and self.chance(0.1):
            args[1] = f"({k}, {max(1, k - 1)})"
            return f"conv({', '.join(args)})", None
        if self.chance(0.12):
            # A transposed convolution instead: the inverse of the sizes above.
            op = args[2:] + (["output_pad=1"] if s > 1 and self.chance(0.3) else [])
            text = f"conv_transpose({out}, {k}{''.join(', ' + a for a in op)})"
            return text, None
        if p is None:
            new = tuple(-(-x // s) for x in spatial)
        else:
            new = tuple((x + 2 * p - d * (k - 1) - 1) // s + 1 for x in spatial)
        return f"conv({', '.join(args)})", (out, *new)

    def pool(self, shape):
        r = self.rng
        c, spatial = shape[0], shape[1:]
        kind = r.choice(["maxpool", "avgpool", "gap", "global_maxpool", "adaptive"])
        if kind in ("gap", "global_maxpool"):
            return kind, (c, *(1 for _ in spatial))
        if kind == "adaptive":
            size = r.randint(1, max(1, min(spatial) + 1))
            op = r.choice(["adaptive_avgpool", "adaptive_maxpool"])
            return f"{op}({size})", (c, *(size for _ in spatial))
        k, s, p, _ = self.window(min(spatial), 4)
        p = min(p, k // 2)
        args = [str(k)]
        stride = k
        if self.chance(0.4):
            stride = s
            args.append(f"stride={s}")
        if p:
            args.append(f"pad={p}")
        ceil = self.chance(0.2)
        if ceil:
            args.append("ceil=true")
        if kind == "avgpool" and self.chance(0.3):
            args.append("count_include_pad=false")
        if ceil:
            return f"{kind}({', '.join(args)})", None
        new = tuple((x + 2 * p - k) // stride + 1 for x in spatial)
        return f"{kind}({', '.join(args)})", (c, *new)

    def norm(self, shape):
        r = self.rng
        c = shape[0]
        choice = r.choice(["layernorm", "groupnorm", "lrn"])
        if choice == "layernorm":
            return r.choice(["layernorm", "layernorm(eps=1e-6)"]), shape
        if choice == "groupnorm":
            g = r.choice([g for g in (1, 2, 4, c) if c % g == 0])
            return f"groupnorm({g})", shape
        return f"lrn({r.choice([1, 3, 5])})", shape

    def tensor(self, shape):
        r = self.rng
        c, spatial = shape[0], shape[1:]
        choice = r.choice(["flatten", "reshape", "transpose", "slice", "pad", "upsample", "split"])
        if choice == "flatten":
            return "flatten", (math.prod(shape),)
        if choice == "reshape":
            total = math.prod(shape)
            if self.chance(0.5):
                return f"reshape(({total},))", (total,)
            if len(spatial) == 2:
                return f"reshape(({c}, {spatial[0] * spatial[1]}))", (c, spatial[0] * spatial[1])
            return f"reshape((-1, {c}, 1))", None
        if choice == "transpose":
            if len(spatial) == 2 and self.chance(0.5):
                return "transpose((1, 3, 2))", (c, spatial[1], spatial[0])
            perm = list(range(1, len(shape) + 1))
            r.shuffle(perm)
            return f"transpose(({', '.join(map(str, perm))}))", tuple(shape[i - 1] for i in perm)
        if choice == "slice":
            axis = r.randint(1, len(shape))
            n = shape[axis - 1]
            start = r.randint(0, max(0, n - 1))
            end = r.choice([n, start + 1, -1, n + 5])
            text = f"slice({start}, {end}" + (f", axis={axis})" if axis != 1 else ")")
            return text, None
        if choice == "pad":
            a = r.choice([1, 2, "(1, 2)", "(0, 1, 1, 0)", -1])
            mode = r.choice(["", ", reflect", ", edge", ", replicate", ", value=-1"])
            return f"pad({a}{mode})", None
        if choice == "upsample":
            if self.chance(0.5):
                mode = r.choice(["", ", mode=bilinear" if len(spatial) == 2 else ", mode=linear"])
                return f"upsample(scale=2{mode})", (c, *(2 * x for x in spatial))
            size = r.randint(1, 40)
            return f"upsample(size={size})", (c, *(size for _ in spatial))
        # split needs a binding: the caller handles a chain that gives several values.
        return "relu", shape

    def misc(self, shape):
        r = self.rng
        if self.chance(0.5):
            return r.choice(["dropout", "drop_path", "dropout(ratio=0.1)"]), shape
        return self.activation(shape[0]), shape

    def mistaken_layer(self) -> str:
        """A layer with an argument of the wrong kind, value or name, or an unknown layer."""
        r = self.rng
        name = r.choice(LAYERS) if self.chance(0.9) else r.choice(JUNK_NAMES)
        layer = all_layers().get(name)
        attrs = list(layer.attrs) if layer else []
        args = []
        for a in attrs:
            if a.kind == "values":
                names = list(self.values) or ["in"]
                n = r.randint(0, 3)
                if _bomb(r, self.s):
                    n = r.randint(2000, 20000)
                args += [r.choice(names) for _ in range(n)]
            elif a.positional or self.chance(0.3):
                value = self.wild_value()
                args.append(value if a.positional and self.chance(0.7) else f"{a.name}={value}")
        if self.chance(0.2):
            args.append(f"{r.choice(ATTR_NAMES)}={self.wild_value()}")
        if self.chance(0.1):
            r.shuffle(args)
        if not args and self.chance(0.5):
            return name
        return f"{name}({', '.join(args)})"

    # -- statements, blocks, networks

    def chain(self, shape, steps: int) -> tuple[list[str], tuple[int, ...] | None]:
        links = []
        for _ in range(steps):
            if shape is None:
                text = self.mistaken_layer() if self.chance(0.2) else self.activation(4)
                links.append(text)
                continue
            text, shape = self.layer(shape)
            if shape is not None and (min(shape) < 1 or math.prod(shape) > 10**7):
                shape = None
            if self.chance(0.25):
                label = self.fresh("l")
                if self.chance(0.3) and self.last_label:
                    # Names that the automatic names and export's inner values also use.
                    suffix = self.rng.choice(
                        ["relu", "lrn", "mul", "scaled", "2", "weight", "last"]
                    )
                    label = f"{self.last_label}.{suffix}"
                elif self.chance(0.1):
                    label = self.rng.choice(["fc", "a.b", "x-1", "image", "in"])
                self.last_label = label
                text = f"{label}: {text}"
            if self.chance(0.05):
                n = self.rng.choice(["0", "2", "3", "-1", "c"])
                if _bomb(self.rng, self.s):
                    n = "1000000"
                text = f"{text} * {n}"
                shape = None if n != "2" or shape is None else shape
            links.append(text)
        return links, shape

    def statements(self, shape, count: int, indent: str = "    ") -> tuple[int, ...] | None:
        r = self.rng
        for _ in range(count):
            roll = r.random()
            if roll < 0.2 and shape is not None:
                # A branch and a merge: a = chain, b = chain, add(a, b).
                start = r.choice(list(self.values)) if self.values and r.random() < 0.3 else None
                base = self.values.get(start, shape) if start else shape
                a, b = self.fresh(), self.fresh()
                links_a, sa = self.chain(base, r.randint(0, 2))
                links_b, sb = self.chain(base, r.randint(0, 2))
                src = start or self.current
                if src is None:
                    # Bind the value the chain carries, so that both branches can name it.
                    src = self.fresh("t")
                    self.lines.append(f"{indent}{src} = dropout")
                self.lines.append(f"{indent}{a} = {' -> '.join([src, *links_a])}")
                self.lines.append(f"{indent}{b} = {' -> '.join([src, *links_b])}")
                self.values[a], self.values[b] = sa or base, sb or base
                merge = r.choice(["add", "add", "mul", "sub", "div", "concat"])
                if merge in ("add", "mul", "sub", "div") and sa != sb and r.random() < 0.8:
                    links_b = links_a = []
                    self.lines[-1] = f"{indent}{b} = {a} -> relu"
                    sb = sa
                extra = f", {a}" if merge in ("add", "mul", "concat") and r.random() < 0.2 else ""
                self.lines.append(f"{indent}{merge}({a}, {b}{extra})")
                if merge == "concat" and sa and sb and sa[1:] == sb[1:]:
                    shape = (sa[0] + sb[0] * (2 if extra else 1), *sa[1:])
                    if extra:
                        shape = (shape[0] + sa[0], *sa[1:])
                elif merge != "concat":
                    shape = sa
                else:
                    shape = None
                self.current = None
                continue
            if roll < 0.27 and shape is not None and shape[0] % 2 == 0 and len(shape) > 1:
                a, b = self.fresh(), self.fresh()
                half = (shape[0] // 2, *shape[1:])
                sections = r.choice(["2", f"({shape[0] // 2}, {shape[0] // 2})", "3"])
                self.lines.append(f"{indent}{a}, {b} = split({sections})")
                self.values[a] = self.values[b] = half
                self.lines.append(f"{indent}{r.choice([a, b])} -> relu")
                shape = half
                self.current = None
                continue
            if roll < 0.35 and self.blocks:
                name, params = r.choice(self.blocks)
                args = []
                for _ in params:
                    if r.random() < 0.85:
                        args.append(
                            str(shape[0] if shape and r.random() < 0.5 else r.choice([4, 8]))
                        )
                if r.random() < 0.1:
                    args.append(self.wild_value())
                call = f"{name}({', '.join(args)})" if args or r.random() < 0.5 else name
                if r.random() < 0.3:
                    call = f"{self.fresh('b')}: {call}"
                if r.random() < 0.2:
                    n = "100000" if _bomb(r, self.s) else r.choice(["2", "3"])
                    call += f" * {n}"
                self.lines.append(f"{indent}{call}")
                shape = None
                continue
            links, shape = self.chain(shape, r.randint(1, 4))
            if r.random() < 0.25:
                name = self.fresh()
                self.lines.append(f"{indent}{name} = {' -> '.join(links)}")
                self.values[name] = shape
                self.current = name
            else:
                self.lines.append(f"{indent}{' -> '.join(links)}")
                self.current = None
        return shape

    current: str | None = None
    last_label: str | None = None
    blocks: list[tuple[str, list[str]]]

    def block(self) -> None:
        r = self.rng
        name = self.fresh("blk")
        params = r.choice([[], ["c"], ["c", "stride=1"], ["c=in.channels"], ["c", "k=3"]])
        body_lines_before = len(self.lines)
        self.lines.append(f"block {name}({', '.join(params)}) {{")
        saved = self.values
        self.values = {"in": (4, 8, 8)}
        self.current = None
        ch = "c" if params and params[0].startswith("c") else "8"
        body = r.choice(
            [
                [f"y = in -> conv({ch}, 3, pad=1) -> relu", f"conv({ch}, 1)", "add(y, in)"],
                [f"conv({ch}, 3, pad=1) -> bn -> relu"],
                ["relu", "bn"],
                [f"y = in -> conv({ch} // 2, 1)", f"z = in -> conv({ch} // 2, 1)", "concat(y, z)"],
                [f"conv(in.channels, 3, pad=1, groups=in.channels) -> conv({ch}, 1)"],
            ]
        )
        self.lines += ["    " + line for line in body]
        if r.random() < 0.3:
            self.statements((4, 8, 8), r.randint(1, 2))
        if params and params[-1] in ("k=3",) and r.random() < 0.5:
            self.lines.append("    maxpool(k, stride=1, pad=k // 2)")
        if self.blocks and r.random() < 0.15:
            self.lines.append(f"    {r.choice(self.blocks)[0]}({ch})")
        self.lines.append("}")
        if r.random() < 0.02:
            del self.lines[body_lines_before + 1 :]
            self.lines.append("}")
        self.values = saved
        self.blocks.append((name, [p.split("=")[0] for p in params]))

    def input_shape(self) -> tuple[int, ...]:
        r = self.rng
        c = r.choice([1, 2, 3, 4, 8])
        if r.random() < 0.2:
            return (c, r.randint(4, 64))
        h = r.randint(4, 32)
        w = h if r.random() < 0.7 else r.randint(4, 32)
        return (c, h, w)

    def program(self) -> str:
        r = self.rng
        self.blocks = []
        for _ in range(r.choice([0, 0, 1, 1, 2])):
            self.block()
        name = self.fresh("net")
        shape = self.input_shape()
        shape_text = _shape_text(shape)
        if r.random() < 0.04:
            shape_text = r.choice(["0x5", "3x0x8", "1x2x3x4", "5", "3x8x8x"])
            if _bomb(r, self.s):
                shape_text = r.choice(["3x100000x100000", "10000000x10000000x1000000"])
        inputs = [f"image: {shape_text}"]
        second = r.random() < 0.1
        if second:
            inputs.append(f"extra: {_shape_text(shape)}")
        self.values = {"image": shape}
        self.current = None
        self.lines.append(f"network {name}({', '.join(inputs)}) {{")
        header = len(self.lines) - 1
        if second:
            self.lines.append("    e = extra -> relu")
        final = self.statements(shape, r.randint(1, 6))
        if second:
            self.lines.append("    add(e, e)" if final is None or r.random() < 0.5 else "    relu")
        if self.values and r.random() < 0.1:
            outs = [n for n in self.values if n != "image"][:2]
            if outs:
                self.lines[header] = (
                    f"network {name}({', '.join(inputs)}) -> ({', '.join(outs)}) {{"
                )
        self.lines.append("}")
        return "\n".join(self.lines) + "\n"


def generate(rng: random.Random, settings: Settings | None = None) -> str:
    """One valid-looking program (most are accepted; the rest fail past the parser)."""
    return _Gen(rng, settings or Settings()).program()


# ---- mutation of the examples ----------------------------------------------------------------

_INT = re.compile(r"(?<![\w.])\d+(?![\w.])")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def mutate(text: str, rng: random.Random, settings: Settings | None = None) -> str:
    """The program ``text`` with one to three random byte-level or token-level mutations."""
    settings = settings or Settings()
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        text = rng.choice(_MUTATIONS)(text, rng, settings)
    return text


def _span(text: str, rng: random.Random) -> tuple[int, int]:
    i = rng.randrange(len(text) + 1)
    return i, min(len(text), i + rng.choice([1, 1, 2, 5, 20, 100]))


def _delete_span(text, rng, s):
    i, j = _span(text, rng)
    return text[:i] + text[j:]


def _insert_bytes(text, rng, s):
    i = rng.randrange(len(text) + 1)
    junk = rng.choice(
        [
            *("(", ")", "{", "}", "[", "]", ",", "->", "*", ":", "=", "x", "-", ".", "#"),
            *("\n", "\t", "\x00", "é", "\u200b", "\\", '"', "1e", "0x", "9" * rng.randint(1, 30)),
        ]
    )
    return text[:i] + junk * rng.choice([1, 1, 2, 5]) + text[i:]


def _duplicate_span(text, rng, s):
    i, j = _span(text, rng)
    k = rng.randrange(len(text) + 1)
    return text[:k] + text[i:j] + text[k:]


def _swap_spans(text, rng, s):
    i, j = _span(text, rng)
    k, m = _span(text, rng)
    if j > k:
        i, j, k, m = k, m, i, j
    if j > k:
        return text
    return text[:i] + text[k:m] + text[j:k] + text[i:j] + text[m:]


def _flip_char(text, rng, s):
    if not text:
        return text
    i = rng.randrange(len(text))
    return text[:i] + chr(rng.randrange(32, 127)) + text[i + 1 :]


def _replace_int(text, rng, s):
    matches = list(_INT.finditer(text))
    if not matches:
        return text
    m = rng.choice(matches)
    values = ["0", "1", "-1", "2", "3", str(rng.randint(0, 100)), "1000"]
    value = rng.choice(BOMB_INTS if _bomb(rng, s) else values)
    return text[: m.start()] + value + text[m.end() :]


def _replace_word(text, rng, s):
    matches = [m for m in _WORD.finditer(text) if m.group() not in ("network", "block")]
    if not matches:
        return text
    m = rng.choice(matches)
    word = m.group()
    if word in all_layers():
        new = rng.choice(LAYERS)
    elif any(word == a for a in ATTR_NAMES):
        new = rng.choice(ATTR_NAMES)
    else:
        words = [w.group() for w in matches]
        new = rng.choice(words + JUNK_NAMES + LAYERS[:5])
    return text[: m.start()] + new + text[m.end() :]


def _lines(text, rng, s):
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    action = rng.choice(["dup", "del", "move"])
    if action == "dup":
        lines.insert(rng.randrange(len(lines) + 1), lines[i])
    elif action == "del":
        del lines[i]
    else:
        line = lines.pop(i)
        lines.insert(rng.randrange(len(lines) + 1), line)
    return "\n".join(lines)


def _unbalance(text, rng, s):
    positions = [i for i, ch in enumerate(text) if ch in "()[]{}"]
    if not positions:
        return text
    i = rng.choice(positions)
    return text[:i] + rng.choice(["", text[i] * 2, ")", "(", "}"]) + text[i + 1 :]


def _nest_block(text, rng, s):
    """Move a statement into a new block and call the block in its place."""
    lines = text.split("\n")
    candidates = [i for i, line in enumerate(lines) if line.startswith("    ") and "=" not in line]
    if not candidates:
        return text
    i = rng.choice(candidates)
    body = lines[i].strip()
    name = f"nest{rng.randrange(100)}"
    lines[i] = f"    {name}(8)"
    depth = 300 if _bomb(rng, s) else rng.choice([1, 1, 2, 3])
    defs = [f"block {name}(c) {{ {body} }}"]
    for d in range(1, depth):
        defs.append(f"block {name}_{d}(c) {{ {name}{'_' + str(d - 1) if d > 1 else ''}(c) }}")
    if depth > 1:
        lines[i] = f"    {name}_{depth - 1}(8)"
    return "\n".join(defs + lines)


def _repeat(text, rng, s):
    lines = text.split("\n")
    candidates = [i for i, line in enumerate(lines) if line.startswith("    ") and line.strip()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    n = rng.choice(["1000000", "100000"]) if _bomb(rng, s) else rng.choice(["2", "3", "0"])
    code = lines[i].split("#")[0].rstrip()
    lines[i] = f"{code} * {n}"
    return "\n".join(lines)


def _shrink_input(text, rng, s):
    """A smaller input shape, so that the mutant reaches the interpreter."""
    m = re.search(r"\((\w+): (\d+)x(\d+)(x(\d+))?", text)
    if not m:
        return text
    size = rng.choice(["1x8x8", "3x32x32", "3x64x64", "3x16", "1x1x1", "3x224x7"])
    return text[: m.start(2)] + size + text[m.end(0) :]


_MUTATIONS = [
    _delete_span,
    _insert_bytes,
    _duplicate_span,
    _swap_spans,
    _flip_char,
    _replace_int,
    _replace_int,
    _replace_word,
    _replace_word,
    _lines,
    _unbalance,
    _nest_block,
    _repeat,
    _shrink_input,
]


# ---- running one input -----------------------------------------------------------------------


class Timeout(BaseException):
    """Raised by the alarm in the middle of an input that took too long."""


@dataclasses.dataclass
class Outcome:
    """What one input did: ``kind`` is accepted, clear error, other exception or timeout."""

    kind: str
    seconds: float
    detail: str = ""  # the exception's type and message
    where: str = ""  # the deepest frame in cnnc: what deduplicates failures
    trace: str = ""
    stage: str = ""  # the last pipeline stage reached


ACCEPTED, CLEAR, OTHER, TIMEOUT = "accepted", "clear error", "other exception", "over time limit"
_PLACE = re.compile(r"^(\S+):(\d+):(\d+): error: ")


def check_message(e: CnncError, program_error: bool) -> str | None:
    """Why ``e`` breaks the one-message contract, or None: a place, one ``error:`` line."""
    if isinstance(e, InternalError):
        return "an internal error"
    if e.where is None:
        return "an error without a place"
    text = e.render()
    lines = text.split("\n")
    if sum(" error: " in line or line.startswith("error: ") for line in lines) != 1:
        return "more than one error line"
    if program_error:
        m = _PLACE.match(lines[0])
        if not isinstance(e.where, Location) or not m or m.group(1) != FILENAME:
            return f"no file:line:col place: {lines[0]!r}"
        if int(m.group(2)) < 1 or int(m.group(3)) < 1:
            return f"a place before the start of the file: {lines[0]!r}"
    return None


def _cnnc_frame(tb) -> str:
    frames = traceback.extract_tb(tb)
    inside = [f for f in frames if "/cnnc/" in f.filename.replace("\\", "/")]
    frame = (inside or frames or [None])[-1]
    if frame is None:
        return "?"
    path = frame.filename.replace("\\", "/")
    path = path[path.rfind("/cnnc/") + 1 :] if "/cnnc/" in path else path.rsplit("/", 1)[-1]
    return f"{path}:{frame.lineno}"


def _activation_elements(graph) -> int:
    biggest = 0
    for value in [*graph.inputs, *(v for n in graph.nodes for v in n.outputs)]:
        dims = value.type.shape[1:]
        if not all(isinstance(d, int) for d in dims):
            return sys.maxsize
        biggest = max(biggest, math.prod(dims))
    return biggest


def run_pipeline(text: str, state: dict) -> None:
    """What a user's compile, dump, summary and export do, and when the network is small, one
    run and the program that ``cnnc import`` would write for it, compiled again."""
    state["stage"] = "parse"
    program = parse(text, FILENAME)
    state["stage"] = "lower"
    graph = lower(program)
    small = graph.param_count() <= SMALL_PARAMS and _activation_elements(graph) <= SMALL_ACTIVATIONS
    if not small:
        state["stage"] = "passes -O1 (large network, no weights)"
        optimize(graph, 1)
        model = Model(graph, random_weights=True)
        state["stage"] = "dump"
        model.dump()
        state["stage"] = "summary"
        model.summary()
        return
    state["stage"] = "weights"
    weights_mod.initialize(graph, 0)
    state["stage"] = "passes -O2"
    names = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    optimize(graph, 2)
    kept = [v.name for v in graph.inputs], [v.name for v in graph.outputs]
    if kept != names:
        raise AssertionError(f"the passes renamed the inputs and outputs {names} to {kept}")
    model = Model(graph, random_weights=True)
    state["stage"] = "dump"
    model.dump()
    state["stage"] = "summary"
    model.summary()
    model.tensors()
    state["stage"] = "onnx export"
    import onnx

    proto = model.to_onnx()
    onnx.checker.check_model(proto)
    proto.SerializeToString()
    state["stage"] = "interpreter"
    outputs = model.run_all_outputs(*model.random_inputs(1))
    for out, value in zip(outputs, graph.outputs, strict=True):
        expected = tuple(1 if i == 0 else d for i, d in enumerate(value.type.shape))
        if tuple(out.shape) != expected:
            raise AssertionError(f"output %{value.name} is {out.shape}, its type says {expected}")
    state["stage"] = "program round trip"
    try:
        program_text, _ = model.to_program()
        lower(parse(program_text, "round-trip.cnn"))
    except CnncError as e:
        # What cnnc import writes for this graph must compile: any error here is cnnc's.
        raise AssertionError(f"the graph's program does not compile: {e.render()}") from e


def run_one(text: str, time_limit: float = 5.0) -> Outcome:
    """Run the pipeline on one program text and classify what happened."""
    state = {"stage": ""}
    use_alarm = hasattr(signal, "setitimer")
    start = time.perf_counter()
    if use_alarm:

        def alarm(signum, frame):
            raise Timeout

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        try:
            # Overflow to inf and NaN is the NaN/inf semantics' business, not a crash.
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                run_pipeline(text, state)
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
    except Timeout as e:
        seconds = time.perf_counter() - start
        return Outcome(
            TIMEOUT, seconds, "Timeout", _cnnc_frame(e.__traceback__), "", state["stage"]
        )
    except CnncError as e:
        seconds = time.perf_counter() - start
        program_error = state["stage"] in ("parse", "lower") or isinstance(e.where, Location)
        problem = check_message(e, program_error)
        if problem is None:
            kind = TIMEOUT if seconds > time_limit else CLEAR
            return Outcome(
                kind, seconds, f"{type(e).__name__}: {e.message}", "", "", state["stage"]
            )
        where = _cnnc_frame(e.__traceback__)
        detail = f"{type(e).__name__} ({problem}): {e.message}"
        trace = "".join(traceback.format_exception(e))
        return Outcome(OTHER, seconds, detail, where, trace, state["stage"])
    except Exception as e:  # what the fuzzer looks for: anything that is not a CnncError
        seconds = time.perf_counter() - start
        detail = f"{type(e).__name__}: {str(e)[:300]}"
        trace = "".join(traceback.format_exception(e))
        return Outcome(OTHER, seconds, detail, _cnnc_frame(e.__traceback__), trace, state["stage"])
    seconds = time.perf_counter() - start
    return Outcome(
        TIMEOUT if seconds > time_limit else ACCEPTED, seconds, "", "", "", state["stage"]
    )


# ---- the campaign ----------------------------------------------------------------------------


def inputs(
    count: int, seed: int, settings: Settings, mutants_share: float = 0.3
) -> Iterator[tuple[str, str]]:
    """``count`` (origin, text) pairs: generated programs (15% of them mutated too) and, a
    ``mutants_share`` of the time, a mutant of the next example in turn."""
    rng = random.Random(seed)
    texts = [(p.name, p.read_text(encoding="utf-8")) for p in EXAMPLES]
    k = 0
    for _ in range(count):
        r = random.Random(rng.getrandbits(64))
        if texts and r.random() < mutants_share:
            name, text = texts[k % len(texts)]
            k += 1
            yield f"mutant of {name}", mutate(text, r, settings)
        else:
            program = generate(r, settings)
            if r.random() < 0.15:
                yield "generated, mutated", mutate(program, r, settings)
            else:
                yield "generated", program


def example_mutants(per_example: int, seed: int, settings: Settings) -> Iterator[tuple[str, str]]:
    """``per_example`` mutants of every example program."""
    rng = random.Random(seed)
    for path in EXAMPLES:
        text = path.read_text(encoding="utf-8")
        for _ in range(per_example):
            yield (
                f"mutant of {path.name}",
                mutate(text, random.Random(rng.getrandbits(64)), settings),
            )


def _origin_kind(origin: str) -> str:
    return "mutated example" if origin.startswith("mutant of ") else "generated"


@dataclasses.dataclass
class Report:
    """The counts of a campaign, the slowest inputs and one failing input per failure class."""

    counts: Counter = dataclasses.field(default_factory=Counter)
    # (generated or mutated example, outcome kind or the stage of a clear error) -> inputs
    by_origin: Counter = dataclasses.field(default_factory=Counter)
    failures: dict = dataclasses.field(default_factory=dict)  # key -> (outcome, text, origin)
    failure_counts: Counter = dataclasses.field(default_factory=Counter)
    slowest: list = dataclasses.field(default_factory=list)  # (seconds, origin, text)
    seconds: float = 0.0

    def add(self, origin: str, text: str, outcome: Outcome) -> None:
        self.counts["tried"] += 1
        self.counts[outcome.kind] += 1
        kind = _origin_kind(origin)
        self.by_origin[kind, "tried"] += 1
        self.by_origin[kind, outcome.kind] += 1
        if outcome.kind == CLEAR:
            self.by_origin[kind, f"error in {outcome.stage}"] += 1
        if outcome.kind in (OTHER, TIMEOUT):
            key = f"{outcome.detail.split(':')[0]} at {outcome.where}"
            if outcome.kind == TIMEOUT:
                key = f"over the time limit in {outcome.stage}"
            self.failure_counts[key] += 1
            if key not in self.failures or len(text) < len(self.failures[key][1]):
                self.failures[key] = (outcome, text, origin)
        if len(self.slowest) < 5 or outcome.seconds > self.slowest[-1][0]:
            self.slowest = sorted([*self.slowest, (outcome.seconds, origin, text)])[::-1][:5]

    def share(self, kind: str, what: str) -> float:
        """The share of ``kind`` inputs (generated or mutated example) that ended in ``what``."""
        return self.by_origin[kind, what] / max(1, self.by_origin[kind, "tried"])

    def text(self) -> str:
        c = self.counts
        tried = c["tried"] or 1
        rate = c["tried"] / max(self.seconds, 1e-9)
        lines = [
            f"tried            {c['tried']:>8,}   ({rate:.0f} inputs/s over {self.seconds:.1f} s)",
            f"accepted         {c[ACCEPTED]:>8,}   ({100 * c[ACCEPTED] / tried:.1f}%)",
            f"clear error      {c[CLEAR]:>8,}   ({100 * c[CLEAR] / tried:.1f}%)",
            f"other exception  {c[OTHER]:>8,}",
            f"over time limit  {c[TIMEOUT]:>8,}",
        ]
        for kind in ("generated", "mutated example"):
            n = self.by_origin[kind, "tried"]
            if not n:
                continue
            stages = sorted(
                (
                    (k[1][9:], v)
                    for k, v in self.by_origin.items()
                    if k[0] == kind and k[1].startswith("error in ")
                ),
                key=lambda t: -t[1],
            )
            lines.append(
                f"{kind}: {n:,} tried, {100 * self.share(kind, ACCEPTED):.1f}% accepted; "
                "clear errors in " + ", ".join(f"{stage} {100 * v / n:.1f}%" for stage, v in stages)
            )
        lines.append(
            "slowest: " + ", ".join(f"{s:.2f} s ({origin})" for s, origin, _ in self.slowest)
        )
        for key, n in self.failure_counts.most_common():
            outcome = self.failures[key][0]
            lines.append(f"FAIL x{n}: {key}: {outcome.detail[:200]}")
        return "\n".join(lines)

    def write_failures(self, directory: Path) -> list[Path]:
        """One reproduction per failure class: the input (.cnn) and its traceback (.txt)."""
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for key, (outcome, text, origin) in self.failures.items():
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:80]
            stem += "-" + hashlib.sha1(key.encode()).hexdigest()[:6]
            path = directory / f"{stem}.cnn"
            path.write_text(text, encoding="utf-8")
            (directory / f"{stem}.txt").write_text(
                f"{key}\n{origin}\nstage: {outcome.stage}\n{outcome.detail}\n\n{outcome.trace}",
                encoding="utf-8",
            )
            written.append(path)
        return written


def _work(item: tuple[str, str, float]) -> tuple[str, str, Outcome]:
    origin, text, limit = item
    return origin, text, run_one(text, limit)


def _worker_init(memory_bytes: int | None) -> None:
    if memory_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def fuzz(
    items: Iterable[tuple[str, str]],
    jobs: int = 1,
    time_limit: float = 5.0,
    memory_bytes: int | None = None,
    progress: Callable[[Report], None] | None = None,
) -> Report:
    """Run every (origin, text) input, in ``jobs`` worker processes when more than one, each
    limited to ``memory_bytes`` of address space; the counts and the failures."""
    report = Report()
    start = time.perf_counter()
    work = ((origin, text, time_limit) for origin, text in items)
    if jobs <= 1:
        results = map(_work, work)
        pool = None
    else:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        pool = context.Pool(jobs, _worker_init, (memory_bytes,), maxtasksperchild=2000)
        results = pool.imap_unordered(_work, work, chunksize=8)
    try:
        for origin, text, outcome in results:
            report.add(origin, text, outcome)
            if progress and report.counts["tried"] % 1000 == 0:
                progress(report)
    finally:
        if pool is not None:
            pool.terminate()
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="inputs to try (default 5000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--time-limit", type=float, default=5.0, help="seconds per input")
    parser.add_argument(
        "--no-bombs",
        action="store_true",
        help="leave out resource bombs (huge counts and sizes), as the quick run does",
    )
    parser.add_argument(
        "--bomb-rate",
        type=float,
        default=Settings.bomb_rate,
        help=f"chance of a bomb at each place that can hold one (default {Settings.bomb_rate})",
    )
    parser.add_argument(
        "--memory",
        type=float,
        default=4.0,
        help="GiB of address space for each worker with --jobs 2 or more (default 4)",
    )
    parser.add_argument(
        "--failures", type=Path, default=Path("fuzz-failures"), help="where to write failing inputs"
    )
    args = parser.parse_args(argv)
    if args.count < 1 or args.jobs < 1 or args.time_limit <= 0:
        parser.error("--count and --jobs must be at least 1, and --time-limit positive")
    settings = Settings(bombs=not args.no_bombs, bomb_rate=args.bomb_rate)

    def progress(report: Report) -> None:
        c = report.counts
        print(
            f"... {c['tried']:,} tried, {c[OTHER]:,} other exceptions, {c[TIMEOUT]:,} over time",
            file=sys.stderr,
            flush=True,
        )

    report = fuzz(
        inputs(args.count, args.seed, settings),
        args.jobs,
        args.time_limit,
        int(args.memory * 2**30) if args.jobs > 1 else None,
        progress,
    )
    print(report.text())
    if report.failures:
        written = report.write_failures(args.failures)
        print(f"{len(written)} failing inputs (one per class) written to {args.failures}/")
    return 1 if report.counts[OTHER] or report.counts[TIMEOUT] else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
