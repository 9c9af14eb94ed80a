"""Every limit on programs, models and runs in one place: the liftable defaults and the hard ones.

A few bytes of program text can ask for unbounded work (``relu * 1000000000000``) or for
sizes no array can have; each limit turns such a request into one clear error at its place.
The liftable limits guard against mistakes and bombs, and a user who means it lifts them
with ``--limit NAME=N`` (or ``limits={"NAME": N}`` in the API). The hard limits are what
NumPy and ONNX can hold (64-bit sizes), and no option lifts them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cnnc.errors import CnncError, UsageError

# ---- hard limits -----------------------------------------------------------------------------

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
"""The largest integer attribute, dimension, element count and byte size: ONNX stores them as
int64 and NumPy indexes with it."""

INT64_DIGITS = len(str(INT64_MAX))  # 19: an integer literal of more digits cannot fit


def fits_int64(n: int) -> bool:
    """Whether an integer fits a signed 64-bit integer."""
    return INT64_MIN <= n <= INT64_MAX


# ---- liftable limits -------------------------------------------------------------------------

GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class Limits:
    """The liftable limits; each name is also the ``--limit NAME=N`` of the command line."""

    repeat: int = 10_000
    """Repetitions of one ``* n``: a deep ResNet repeats a block tens of times, not millions."""

    layers: int = 100_000
    """IR nodes in one network after blocks and repetitions are expanded (the largest
    example, VGG-16, has 40; a hand-written 100,000-step chain still compiles)."""

    operands: int = 10_000
    """Arguments of one call, such as the values ``add`` or ``concat`` merge."""

    expr_depth: int = 100
    """Nesting of one argument expression (operators, unary minus, tuples)."""

    block_depth: int = 100
    """Blocks calling blocks, counted from the network."""

    program_bytes: int = 16 * MiB
    """Size of a program's text (the largest example is 5 KB)."""

    param_bytes: int = 16 * GiB
    """Bytes of all parameter tensors of one network (VGG-16 has 0.55 GB)."""

    memory: int | None = None
    """Bytes one run may need (inputs and the largest set of live activations at once);
    None means the memory the machine has available now (MemAvailable)."""

    def replace(self, **changes: int) -> Limits:
        """These limits with some changed; an unknown name is a UsageError listing the names."""
        for name, value in changes.items():
            if name not in NAMES:
                raise UsageError(
                    f"unknown limit {name!r}", hint="the limits are: " + ", ".join(NAMES)
                )
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise UsageError(f"limit {name} must be a positive integer, got {value!r}")
        return dataclasses.replace(self, **changes)


NAMES = tuple(f.name for f in dataclasses.fields(Limits))

DEFAULT = Limits()


def coerce(limits: Limits | Mapping[str, int] | None) -> Limits:
    """``limits=`` of the API: a Limits, a dict of the limits to change, or None (defaults)."""
    if limits is None:
        return DEFAULT
    if isinstance(limits, Limits):
        return limits
    if isinstance(limits, Mapping):
        return DEFAULT.replace(**dict(limits))
    raise UsageError(f"limits must be a cnnc.Limits or a dict, got {type(limits).__name__}")


def parse_option(specs: list[str]) -> Limits:
    """The limits of ``--limit NAME=N`` options (N may use _ and the suffixes K, M, G, Ki,
    Mi, Gi, Ti)."""
    changes: dict[str, int] = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise UsageError(
                f"--limit takes NAME=N, got {spec!r}", hint="the limits are: " + ", ".join(NAMES)
            )
        changes[name] = _number(text.strip(), spec)
    return DEFAULT.replace(**changes)


_SUFFIXES = {
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}


def _number(text: str, spec: str) -> int:
    upper = text.upper().removesuffix("B")
    scale = 1
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if upper.endswith(suffix):
            upper, scale = upper[: -len(suffix)], _SUFFIXES[suffix]
            break
    if not upper.replace("_", "").isdigit() or len(upper) > INT64_DIGITS + 5:
        raise UsageError(f"--limit {spec}: expected a positive integer such as 20000 or 32Gi")
    return int(upper) * scale


# ---- the limits in force -----------------------------------------------------------------------

_CURRENT: contextvars.ContextVar[Limits] = contextvars.ContextVar("cnnc_limits", default=DEFAULT)


def current() -> Limits:
    """The limits of the compile, load or parse in progress (the defaults outside one)."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(limits: Limits) -> Iterator[Limits]:
    """Make ``limits`` the ones in force inside the ``with`` block."""
    token = _CURRENT.set(limits)
    try:
        yield limits
    finally:
        _CURRENT.reset(token)


def hint(name: str, value: int) -> str:
    """How to lift limit ``name`` far enough for ``value``."""
    return (
        f"lift it with --limit {name}={_round_up(value)} "
        f"(limits={{'{name}': {_round_up(value)}}} in the API) if you mean it"
    )


def _round_up(value: int) -> int:
    """A round number at least ``value``: what a hint proposes."""
    if value < 10:
        return max(value, 1)
    step = 10 ** (len(str(value)) - 2)
    return -(-value // step) * step


def exceeded(
    kind: type[CnncError], name: str, what: str, value: int, where=None, unit: str = ""
) -> CnncError:
    """The error for a value past liftable limit ``name``; ``what`` leads up to the value
    ("the repetition count is")."""
    limit = getattr(current(), name)

    def show(n: int) -> str:
        if unit != "bytes":
            return f"{n:,}{unit}"
        return f"{n:,} bytes ({format_bytes(n)})" if n >= 2**10 else f"{n} bytes"

    return kind(
        f"{what} {show(value)}, more than the limit of {show(limit)} ({name})",
        where,
        hint=hint(name, value),
    )


# ---- sizes -------------------------------------------------------------------------------------


def tensor_bytes(shape, itemsize: int) -> int:
    """Exact bytes of a tensor of ``shape`` (symbolic dimensions count as 1), in Python's
    unbounded integers: no product ever overflows."""
    return math.prod(d if isinstance(d, int) else 1 for d in shape) * itemsize


def format_bytes(n: int) -> str:
    """``1,234,567,890`` -> ``1.1 GiB``: sizes as messages show them."""
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} bytes"


def memory_available() -> int | None:
    """Bytes the machine can give a new allocation now: MemAvailable from /proc/meminfo,
    else the free physical pages; None where neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def run_memory(graph, batch: int, scale: float = 1.0, keep_all: bool = False) -> tuple[int, str]:
    """An estimate of the bytes a run of ``graph`` on ``batch`` items needs, and the node
    where the need peaks: the inputs, the parameters not yet in memory, and, at the worst
    node, every activation alive there (made and not yet read for the last time) plus a
    copy of that node's largest input (a padded copy, a kernel's workspace). ``scale``
    grows the activations of a fully convolutional network run on larger inputs;
    ``keep_all`` keeps every value to the end (a run that records them all). Sizes are
    exact integers; no array is made."""

    def nbytes(value) -> int:
        shape = [batch if not isinstance(d, int) else d for d in value.type.shape]
        size = tensor_bytes(shape, value.type.numpy_dtype.itemsize)
        return size if value.kind == "param" else math.ceil(size * scale)

    last_use: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            last_use[id(v)] = i
    kept = {id(v) for v in graph.outputs} | {id(v) for v in graph.inputs}
    params = sum(nbytes(v) for v in graph.params.values() if not v.in_memory)
    live = sum(nbytes(v) for v in graph.inputs)
    peak, where = live, "the inputs"
    for i, node in enumerate(graph.nodes):
        live += sum(nbytes(out) for out in node.outputs)
        workspace = max((nbytes(v) for v in node.activations), default=0)
        if live + workspace > peak:
            peak, where = live + workspace, f"node {node.name} ({node.op})"
        for v in set(node.activations):
            if last_use.get(id(v)) == i and id(v) not in kept and not keep_all:
                live -= nbytes(v)
    return params + peak, where


def check_run_memory(
    graph,
    batch: int,
    scale: float = 1.0,
    limits: Limits | None = None,
    keep_all: bool = False,
) -> None:
    """Refuse a run whose estimated need (:func:`run_memory`) is more than the limit
    ``memory``, or, without one, than the memory available now."""
    limits = limits or current()
    budget = limits.memory if limits.memory is not None else memory_available()
    if budget is None:
        return
    need, where = run_memory(graph, batch, scale, keep_all)
    if need > budget:
        what = (
            f"the limit of {budget:,} bytes (memory)"
            if limits.memory is not None
            else f"the {format_bytes(budget)} of memory available"
        )
        raise UsageError(
            f"running {graph.name} on a batch of {batch:,} needs about {need:,} bytes "
            f"({format_bytes(need)}, the most at {where}), more than {what}",
            hint="run a smaller batch or input; or, if the machine can page that much, "
            f"lift the check with --limit memory={_round_up(need)}",
        )
