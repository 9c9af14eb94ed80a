"""The resource bombs and malformed inputs of issue 11, each run as a user would run it.

    python tests/probe_bombs.py [--json]

Every case is a fresh ``python -m cnnc ...`` process on a few bytes of input; the probe
prints its exit status, wall time, peak resident memory (from the kernel, via wait4) and
the first line of what it said, and checks the issue's target: refused (exit 1, one
``error:`` line, no traceback) within 1 s and 200 MB. The time includes Python's start
and cnnc's imports (about 0.2-0.4 s), so the bound is on the whole command. Exits 1 if
any case misses the target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TIME_LIMIT = 1.0  # seconds
MEMORY_LIMIT = 200 * 2**20  # bytes of peak resident memory
GIVE_UP = 30.0  # seconds after which a case is killed (and counted as a miss)


def block_chain(depth: int) -> str:
    blocks = ["block b0() { relu }"]
    blocks += [f"block b{i}() {{ b{i - 1} }}" for i in range(1, depth)]
    return "\n".join(blocks) + f"\nnetwork n(x: 1x8x8) {{ b{depth - 1} }}\n"


def programs() -> dict[str, str]:
    """Name -> program text of each program bomb."""
    return {
        "relu * 10**12": "network n(x: 1x8x8) { relu * 1000000000000 }",
        "block b(3) * 10**6": "block b(c) { conv(c, 3, pad=1) -> relu }\n"
        "network n(x: 3x8x8) { b(3) * 1000000 }",
        "conv * 10**5": "network n(x: 8x8x8) { conv(8, 3, pad=1) * 100000 }",
        "nested repeats 10**3 * 10**3 * 10**3": "block a() { relu * 1000 }\n"
        "block b() { a * 1000 }\nnetwork n(x: 1x8x8) { b * 1000 }",
        "add of 100,000 operands": "network n(x: 1x8x8) { add("
        + ", ".join(["x"] * 100_000)
        + ") }",
        "conv(10**6) -> conv(10**6)": "network n(x: 3x8x8) "
        "{ conv(1000000, 3) -> conv(1000000, 3) }",
        "pad=10**12": "network n(x: 3x8x8) { conv(8, 3, pad=1000000000000) }",
        "stride=2**63": f"network n(x: 3x8x8) {{ conv(8, 3, stride={2**63}) }}",
        "conv(2**63)": f"network n(x: 3x8x8) {{ conv({2**63}, 3) }}",
        "flatten of 10**20 values": "network n(x: 10000000x10000000x1000000) { flatten -> fc(2) }",
        "integer of 4,301 digits": "network n(x: 3x8x8) { conv(" + "9" * 4301 + ", 3) }",
        "485 nested -": "network n(x: 3x8x8) { conv(" + "-" * 485 + "8, 3) }",
        "1+1+... 100,000 terms": "network n(x: 3x8x8) { conv("
        + "+".join(["1"] * 100_000)
        + ", 3) }",
        "(((...))) 100,000 deep": "network n(x: 3x8x8) { conv("
        + "(" * 100_000
        + "8"
        + ")" * 100_000
        + ", 3) }",
        "blocks nested 198 deep": block_chain(198),
        "blocks nested 5,000 deep": block_chain(5000),
    }


def onnx_bombs(folder: Path) -> dict[str, Path]:
    """Name -> path of each hostile ONNX model."""
    out = {}
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2**62])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2**62])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "huge", [x], [y])
    path = folder / "dim_2_62.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    out["ONNX input dim 2**62"] = path

    shape = numpy_helper.from_array(np.array([1, 1, 40000, 40000], np.int64), "shape")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 40000, 40000])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["c"]),
        helper.make_node("Add", ["x", "c"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "fill", [x], [y], initializer=[shape])
    path = folder / "constant_of_shape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    out["ONNX ConstantOfShape 40000x40000"] = path

    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 1, 3, 3])
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="../../../etc/passwd")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "ext", [x], [y], initializer=[w]
    )
    path = folder / "external_outside.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    out["ONNX external data outside its folder"] = path

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    )
    helper.set_model_props(model, {"cnnc.min_input_shape": "abc"})
    path = folder / "bad_metadata.onnx"
    onnx.save(model, path)
    out["ONNX metadata min_input_shape=abc"] = path
    return out


def weights_bombs(folder: Path) -> dict[str, Path]:
    out = {}
    path = folder / "empty.npz"
    path.write_bytes(b"")
    out["weights: 0-byte file"] = path
    path = folder / "not_npy.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("c.weight.npy", b"this is not an array")
    out["weights: member that is not .npy"] = path
    header = {"descr": "<f4", "fortran_order": False, "shape": (2**20, 2**20, 40)}
    text = repr(header).encode()
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\0" * 800
    path = folder / "claims_150TiB.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("c.weight.npy", member)
    out["weights: 1 KB header claiming 160 TiB"] = path
    return out


def cases(folder: Path) -> list[tuple[str, list[str], int]]:
    """(name, argv after `python -m cnnc`, the exit status it must end with) of every
    case: 1 for a refusal; 0 for a command that has no reason to refuse (dump and
    summary of a huge network never run it)."""
    result = []
    for name, text in programs().items():
        path = folder / (name.translate(str.maketrans(" */(),.=-+", "__________")) + ".cnn")
        path.write_text(text)
        out = str(folder / "o.onnx")
        result.append((f"program: {name}", ["compile", str(path), "-o", out], 1))
    big = folder / "big_bn.cnn"
    big.write_text("network n(x: 3x100000x100000) { conv(8, 3) -> bn }")
    for command in ("dump", "summary"):
        result.append((f"conv -> bn on 3x100000x100000: {command}", [command, str(big)], 0))
    result.append(
        (
            "conv -> bn on 3x100000x100000: compile",
            ["compile", str(big), "-o", str(folder / "big.onnx")],
            0,
        )
    )
    result.append(("conv -> bn on 3x100000x100000: run", ["run", str(big)], 1))
    wide = folder / "wide.cnn"
    wide.write_text("network n(image: 100000x32x32) { conv(64, 3) -> bn -> relu -> gap -> fc(10) }")
    for command in ("dump", "summary"):
        result.append((f"image 100000x32x32: {command}", [command, str(wide)], 0))
    for name, path in onnx_bombs(folder).items():
        for command in ("dump", "summary", "compile", "import"):
            argv = [command, str(path)]
            if command == "compile":
                argv += ["-o", str(folder / "out.onnx")]
            if command == "import":
                argv += ["-o", str(folder / "imported.cnn")]
            result.append((f"{name}: {command}", argv, 1))
    tiny = folder / "tiny.cnn"
    tiny.write_text("network tiny(x: 1x4x4) { c: conv(2, 3, pad=1) -> relu -> f: fc(3) }")
    for name, path in weights_bombs(folder).items():
        result.append((name, ["run", str(tiny), "--weights", str(path)], 1))
    empty = folder / "empty.npy"
    empty.write_bytes(b"")
    result.append(("input: 0-byte .npy", ["run", str(tiny), "--input", str(empty)], 1))
    zero = folder / "zero.npy"
    np.save(zero, np.zeros((0, 1, 4, 4), np.float32))
    result.append(("input: batch of 0", ["run", str(tiny), "--input", str(zero)], 1))
    result.append(("-o a directory (compile)", ["compile", str(tiny), "-o", str(folder)], 1))
    good = folder / "good.onnx"
    # Not bombs: a good compile (the cost of a command that does its work, for comparison)
    # and a write to a full device, which fails only once the model is written.
    result.append(
        ("baseline: a good compile (unbounded)", ["compile", str(tiny), "-o", str(good)], 0)
    )
    result.append(("-o a directory (import)", ["import", str(good), "-o", str(folder)], 1))
    if os.path.exists("/dev/full"):
        result.append(("-o /dev/full (unbounded)", ["compile", str(tiny), "-o", "/dev/full"], 1))
    return result


def run(argv: list[str]) -> dict:
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "cnnc", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    timer = threading.Timer(GIVE_UP, process.kill)
    timer.start()
    stderr = process.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    timer.cancel()
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if seconds >= GIVE_UP:
        stderr += f"\nerror: killed after {GIVE_UP:g} s"
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line or line.startswith("error: ")]
    return {
        "status": process.returncode,
        "seconds": seconds,
        "peak_bytes": usage.ru_maxrss * 1024,
        "message": errors[0] if errors else (lines[0] if lines else ""),
        "traceback": "Traceback" in stderr,
        "one_error": len(errors) == 1,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = []
        for name, argv, expected in cases(folder):
            result = run(argv) | {"case": name, "expected": expected}
            result["ok"] = (
                result["status"] == expected
                and (result["one_error"] or expected == 0)
                and not result["traceback"]
                and (
                    "(unbounded)" in name
                    or (result["seconds"] <= TIME_LIMIT and result["peak_bytes"] <= MEMORY_LIMIT)
                )
            )
            results.append(result)
            if not args.json:
                print(
                    f"{'ok ' if result['ok'] else 'MISS'} {name[:44]:44s} exit {result['status']}"
                    f" {result['seconds']:5.2f} s {result['peak_bytes'] / 2**20:6.0f} MB  "
                    f"{result['message'].replace(str(folder) + '/', '')[:110]}",
                    flush=True,
                )
        for path in folder.iterdir():  # nothing a refused command wrote may remain
            if path.name in ("o.onnx", "out.onnx", "imported.cnn", "imported.npz", "tmp"):
                results.append({"case": f"left behind: {path.name}", "ok": False})
    missed = [r for r in results if not r["ok"]]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(
            f"{len(results) - len(missed)} of {len(results)} ended as they must (refused with "
            f"one message, or done) within {TIME_LIMIT:g} s and {MEMORY_LIMIT / 2**20:.0f} MB"
        )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
