"""`cnnc bench --optimizers`: cnnc -O2 beside onnxsim, onnxslim and onnxoptimizer (README,
"Optimizing existing ONNX models"). Times are never asserted; what the table says about
the outputs is checked against the output files themselves."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
from conftest import run_cnnc

import cnnc
from cnnc import bench_optimize
from cnnc.compare import agree

HAVE_ONNXSIM = importlib.util.find_spec("onnxsim") is not None


def _outputs(path: str, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_the_table_says_what_each_tools_output_holds(tmp_path):
    # onnxsim runs beside cnnc where it is installed (it is in cnnc[bench]); where it is
    # not, its column must say so.
    print(f"onnxsim {'importable: compared' if HAVE_ONNXSIM else 'not installed: named'}")
    source = tmp_path / "lenet5.onnx"
    cnnc.compile("examples/lenet5.cnn", opt_level=0).write_onnx(source)
    out = tmp_path / "out"
    proc = run_cnnc(
        "bench", "--optimizers", source, "--rounds", "2", "--tools", "cnnc,onnxsim",
        "--out", out, "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rounds"] == 2 and report["threads"] == 2
    [row] = report["models"]
    original = onnx.load(source)
    assert row["original"]["nodes"] == len(original.graph.node) == 13
    assert row["original"]["checker"] == "ok"
    feeds = {"image": np.random.default_rng(5).standard_normal((1, 1, 28, 28), dtype=np.float32)}
    expected = _outputs(str(source), feeds)
    for tool in ("cnnc", "onnxsim") if HAVE_ONNXSIM else ("cnnc",):
        result = row["tools"][tool]
        assert result["status"] == "ok", result
        written = onnx.load(result["path"])
        assert result["nodes"] == len(written.graph.node)
        assert result["initializers"] == len(written.graph.initializer)
        read = {name for n in written.graph.node for name in n.input}
        unused = [i for i in written.graph.initializer if i.name not in read]
        assert result["unused_initializers"] == len(unused)
        ops = Counter(
            f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in written.graph.node
        )
        assert result["ops"] == dict(ops)
        inlined = onnx.inliner.inline_local_functions(written)
        assert result["inlined_nodes"] == len(inlined.graph.node) >= result["nodes"]
        onnx.checker.check_model(result["path"], full_check=True)
        assert result["checker"] == "ok"
        got = _outputs(result["path"], feeds)
        assert (
            result["agree"] is all(agree(a, e) for a, e in zip(got, expected, strict=True)) is True
        )
        assert result["max_diff"] < 1e-3
        for level in ("default", "disabled"):
            latency = result["latency"][level]
            assert len(latency["ratios"]) == 2
            assert latency["p10"] <= latency["median"] <= latency["p90"]
        assert result["seconds"] > 0
    # cnnc -O2 folds lenet5's flatten/bias chain: fewer nodes than the -O0 export
    assert row["tools"]["cnnc"]["nodes"] < 13
    if not HAVE_ONNXSIM:
        assert row["tools"]["onnxsim"] == {**row["tools"]["onnxsim"], "status": "not installed"}
        assert row["tools"]["onnxsim"]["error"] == "not installed: pip install onnxsim"
    text = bench_optimize.render(report)
    cells = f"| lenet5.onnx | 13 ({len(original.graph.initializer)}) | "
    cells += f"{row['tools']['cnnc']['nodes']} ({row['tools']['cnnc']['initializers']}) | "
    assert cells in text
    assert "| lenet5.onnx | ok | ok, same | " in text
    assert "### Where cnnc loses" in text


def test_a_tool_that_hangs_or_crashes_is_a_result_and_a_missing_one_is_named(tmp_path, monkeypatch):
    hung = bench_optimize._child(["summary", "/nonexistent.onnx"], timeout=0.001)
    assert (hung.status, hung.error) == ("timed out", "no result after 0.001 s")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert bench_optimize.tool_status("onnxslim") == "not installed: pip install onnxslim"
    # a row of a failed tool, rendered
    missing = bench_optimize.tool_status("onnxsim")
    report = {
        "tools": ["cnnc", "onnxsim"], "rounds": 1, "threads": 2, "seed": 0, "notes": [],
        "machine": "", "models": [{
            "name": "m", "group": "file", "path": "m.onnx", "error": None,
            "original": {"nodes": 3, "initializers": 1, "ops": {}, "checker": "ok"},
            "tools": {
                "cnnc": {"status": "timed out", "error": "no result after 5 s"},
                "onnxsim": {"status": "not installed", "error": missing},
            },
        }],
    }  # fmt: skip
    text = bench_optimize.render(report)
    assert "| m | 3 (1) | timed out | not installed |" in text
    assert "- onnxsim: not installed: pip install onnxsim" in text
    assert "- m: cnnc timed out: no result after 5 s" in text
    # a model that cannot be read is not a model where cnnc does not lose
    unread = {"name": "bad", "group": "file", "path": "bad.onnx", "original": None, "tools": {}}
    report["models"] = [{**unread, "error": "cannot read the model: truncated"}]
    text = bench_optimize.render(report)
    where = text[text.index("### Where cnnc loses") :]
    assert "- bad: not compared: cannot read the model: truncated" in where
    assert "nowhere" not in where
