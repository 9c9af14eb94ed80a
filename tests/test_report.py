"""cnnc report: one self-contained HTML page, its sections, its pictures, its errors, and
the page as headless Chromium shows it (tests/browser_check.py)."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import cnnc
from cnnc.cli import main
from cnnc.ir import printer
from cnnc.viz import report

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SECTIONS = ["where", "summary", "graph", "maps", "dump"]

sys.path.insert(0, str(Path(__file__).resolve().parent))
import browser_check  # noqa: E402

CHROMIUM = browser_check.find_chromium()

# A network of two instances of a block: clusters in the graph, subtotals in the table.
BLOCKS = """block basic(c) {
    y = in -> conv(c, 3, pad=1) -> relu -> conv(c, 3, pad=1)
    add(y, in) -> relu
}
network blocks(image: 3x16x16) {
    stem: conv(8, 3, pad=1) -> relu
    basic(8) * 2
    gap -> fc(4)
}
"""


class Page(HTMLParser):
    """What a browser would fetch or show: every src/href, the section ids, the <img>s."""

    def __init__(self, text: str):
        super().__init__()
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.ids: list[str] = []
        self.images: list[str] = []
        self.tags: set[str] = set()
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "action", "poster", "xlink:href"):
                self.links.append((tag, name, value or ""))
            if name == "id" and tag == "section":
                self.ids.append(value)
            if tag == "img" and name == "src":
                self.images.append(value or "")


@pytest.fixture
def maps():
    """Feature maps need Pillow (cnnc[viz], in the test extra)."""
    pytest.importorskip("PIL", reason="Pillow (cnnc[viz]) is needed to draw feature maps")


def _make(tmp_path: Path, *args: str, name: str = "r.html") -> tuple[int, Path]:
    out = tmp_path / name
    status = main(["report", *args, "-o", str(out)])
    return status, out


def _svgs(text: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", text, flags=re.S)


def test_the_page_is_self_contained_and_has_every_section(tmp_path, maps, capsys):
    status, out = _make(tmp_path, str(EXAMPLES / "lenet5.cnn"))
    assert status == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    assert page.ids == SECTIONS
    # Nothing to fetch: every src is a data: URI, every href an anchor in the page.
    for tag, attribute, value in page.links:
        if attribute == "href":
            assert value.startswith("#"), (tag, value)
        else:
            assert value.startswith("data:image/png;base64,"), (tag, value[:60])
    assert not {"link", "iframe", "object", "embed", "base"} & page.tags
    # The only URLs are the SVG namespace, which is a name, not a request.
    assert set(re.findall(r"https?://[^\s\"'<>)]+", text)) <= {"http://www.w3.org/2000/svg"}
    # CSS and SVG refer only to the page itself (an arrowhead's marker: url(#id)).
    assert all(u.startswith("#") for u in re.findall(r"url\(\s*['\"]?([^)'\"]*)", text))
    assert "@import" not in text
    # Header: the name, the figures (those cnnc summary prints), the version.
    model = cnnc.load(EXAMPLES / "lenet5.cnn", opt_level=0)
    assert "<h1>lenet5</h1>" in text
    assert f"{model.param_count():,}" in text
    macs = re.search(r"multiply-accumulates per item: ([\d,]+)", printer.summary(model.graph))
    assert macs.group(1) in text
    assert f"cnnc {cnnc.__version__}" in text
    # The dump is the -O2 one, escaped.
    assert "IR dump (-O2)" in text
    assert "network lenet5  (-O2: " in text
    assert "%image" in text and "<pre>" in text


def test_the_table_is_cnnc_summarys(tmp_path):
    """Blocks with subtotals and the totals, as printer.summary_data gives them."""
    program = tmp_path / "blocks.cnn"
    program.write_text(BLOCKS)
    model = cnnc.load(program, opt_level=0)
    data = printer.summary_data(model.graph)
    table = report.summary_table(model.graph)
    body = re.findall(r"<tr class=\"(block|layer)\">", table)
    assert body == [r["kind"] for r in data["rows"]]
    assert body.count("block") == 3  # basic(8) * 2: the repetition, then its two instances
    totals = re.search(r"<tfoot>.*</tfoot>", table).group(0)
    assert f"{data['totals']['params']:,}" in totals
    assert f"{data['totals']['macs']:,}" in totals


def test_pictures_are_png_data_uris_within_the_cap(tmp_path, maps):
    from PIL import Image

    status, out = _make(tmp_path, str(EXAMPLES / "lenet5.cnn"))
    assert status == 0
    images = Page(out.read_text(encoding="utf-8")).images
    assert images
    for src in images:
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            assert 0 < max(image.size) <= report.MAX_PICTURE_SIDE


def test_a_large_picture_is_shrunk_keeping_its_palette():
    Image = pytest.importorskip("PIL.Image", reason="Pillow (cnnc[viz]) is not installed")
    image = Image.fromarray(np.tile(np.arange(250, dtype=np.uint8), (300, 4)), "L").convert("P")
    out = io.BytesIO()
    image.save(out, format="PNG")
    small = report.shrink_png(out.getvalue())
    with Image.open(io.BytesIO(small)) as shrunk:
        assert shrunk.size == (report.MAX_PICTURE_SIDE, round(300 * report.MAX_PICTURE_SIDE / 1000))
        assert shrunk.mode == "P"
    assert report.shrink_png(small) == small  # within the cap: unchanged


def test_the_svgs_parse_as_xml(tmp_path, maps):
    status, out = _make(tmp_path, str(EXAMPLES / "lenet5.cnn"))
    assert status == 0
    svgs = _svgs(out.read_text(encoding="utf-8"))
    assert len(svgs) == 3  # the two charts and the graph
    assert 'class="cnnc-graph"' in svgs[2] and "<title>lenet5</title>" in svgs[2]
    for svg in svgs:
        root = ET.fromstring(svg)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert float(root.get("width")) > 0 and float(root.get("height")) > 0


def test_the_caption_gives_the_fc_share_of_the_model_at_hand(tmp_path, maps):
    """VGG-16: the fc layers' share of the parameters (the tutorial's 89%) as cnnc
    summary computes it; the GAP classifier: no fc layer at all."""
    model = cnnc.load(EXAMPLES / "vgg16.cnn", opt_level=0)
    rows = report.layer_rows(model.graph)
    share = re.search(r"parameters by op: fc (\d+\.\d)%", printer.summary(model.graph))
    caption = report.fc_caption(rows)
    assert f"The 3 fc layers hold {share.group(1)}% of the parameters" in caption
    fc = sum(r.params for r in rows if r.kind == "fc")
    assert f"({fc:,} of {model.param_count():,})" in caption
    assert "gap" in caption
    gap = cnnc.load(EXAMPLES / "gap_classifier.cnn", opt_level=0)
    assert report.fc_caption(report.layer_rows(gap.graph)).startswith(
        "This network has no fc layer"
    )
    # The per-layer chart has one bar pair per layer with parameters or MACs.
    chart = ET.fromstring(report.layer_chart(rows))
    bars = chart.findall("{http://www.w3.org/2000/svg}rect")
    assert len(bars) == 2 * sum(1 for r in rows if r.params or r.macs)


def test_an_array_input_is_the_maps_input(tmp_path, maps, monkeypatch):
    seen = []
    draw = report._layer_pngs()
    monkeypatch.setattr(
        report, "_layer_pngs", lambda: lambda model, x, **kw: seen.append(x) or draw(model, x, **kw)
    )
    x = np.random.default_rng(3).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    status, out = _make(tmp_path, str(EXAMPLES / "lenet5.cnn"), "--input", str(tmp_path / "x.npy"))
    assert status == 0
    assert np.array_equal(seen[0], x[:1])  # the first item of a batch
    assert f"For {tmp_path / 'x.npy'}" in out.read_text(encoding="utf-8")


def test_an_image_input_is_read_resized_and_noted(tmp_path, maps):
    from PIL import Image

    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "photo.png")
    status, out = _make(
        tmp_path, str(EXAMPLES / "lenet5.cnn"), "--input", str(tmp_path / "photo.png")
    )
    assert status == 0
    text = out.read_text(encoding="utf-8")
    assert "1 image, resized and cropped to 28x28" in text


def test_layers_chooses_the_pictures(tmp_path, maps):
    status, out = _make(tmp_path, str(EXAMPLES / "lenet5.cnn"), "--layers", "c1,c2")
    assert status == 0
    names = [a for a in re.findall(r'<img alt="([^"]*)"', out.read_text(encoding="utf-8"))]
    assert [n for n in names if not n.startswith("@")] == ["c1", "c2"]


def test_a_network_of_two_inputs_gets_no_feature_maps(tmp_path, capsys):
    program = tmp_path / "two.cnn"
    program.write_text(
        "network two(a: 3x8x8, b: 3x8x8) {\n"
        "    x = a -> conv(4, 3, pad=1) -> relu\n"
        "    y = b -> conv(4, 3, pad=1)\n"
        "    add(x, y) -> gap -> fc(5)\n"
        "}\n"
    )
    status, out = _make(tmp_path, str(program))
    assert status == 0
    page = Page(out.read_text(encoding="utf-8"))
    assert page.ids == SECTIONS and not page.images
    assert "No feature maps: the network has 2 inputs" in out.read_text(encoding="utf-8")
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    status, _ = _make(tmp_path, str(program), "--input", str(tmp_path / "x.npy"), name="s.html")
    assert status == 1
    assert "two has 2 inputs; the report draws the feature maps" in capsys.readouterr().err
    assert not (tmp_path / "s.html").exists()


def test_errors_are_clear_and_leave_no_file(tmp_path, capsys):
    np.save(tmp_path / "wrong.npy", np.zeros((1, 3, 28, 28), np.float32))
    cases = [
        (["--input", str(tmp_path / "wrong.npy")], "wrong.npy", "r.html"),
        (["--input", str(tmp_path / "missing.npy")], "missing.npy", "r.html"),
        (["--layers", "c1,nope"], "no layer named 'nope'", "r.html"),
        ([], "does not exist", "no/such/dir/r.html"),
        ([], "is a directory", "."),
    ]
    for extra, expected, name in cases:
        status, _ = _make(tmp_path, str(EXAMPLES / "lenet5.cnn"), *extra, name=name)
        err = capsys.readouterr().err
        assert status == 1, err
        assert expected in err and "error:" in err
        assert "Traceback" not in err
        assert not (tmp_path / "r.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong.npy"]  # no temporary file


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed, so the page was not checked in a browser "
    "(apt-get install -y chromium; then python tests/browser_check.py PAGE --screenshot OUT.png)",
)
def test_the_page_renders_in_headless_chromium(tmp_path, maps):
    status, out = _make(tmp_path, str(EXAMPLES / "lenet5.cnn"))
    assert status == 0
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "browser_check.py"),
            str(out),
            "--screenshot",
            str(shot),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 console error(s)" in run.stdout and run.stdout.strip().endswith("ok")
    images = len(Page(out.read_text(encoding="utf-8")).images)
    assert f"{images}/{images} images loaded" in run.stdout
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


# A click on the first block's title, in the page: the graph's height before and after.
FOLD_FIRST_BLOCK = """(() => {
  const svg = document.querySelector('svg.cnnc-graph');
  const before = svg.getBoundingClientRect().height;
  svg.querySelector('.ctitle').dispatchEvent(new MouseEvent('click', {bubbles: true}));
  return [before, svg.getBoundingClientRect().height];
})()"""


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (see the test above)")
def test_the_graph_folds_inside_the_page(tmp_path, maps):
    """The graph's folding script runs inline in the report: a click folds a block."""
    program = tmp_path / "blocks.cnn"
    program.write_text(BLOCKS)
    status, out = _make(tmp_path, str(program), "--layers", "stem")
    assert status == 0
    result = browser_check.check(out, evaluate=FOLD_FIRST_BLOCK)
    assert result["problems"] == []
    before, after = result["evaluated"]
    assert 0 < after < before


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (see the test above)")
def test_the_browser_check_finds_a_broken_page(tmp_path):
    """The check fails a page that fetches, holds a broken picture and throws."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><body>"
        '<img alt="remote" src="http://127.0.0.1:9/x.png">'
        '<img alt="broken" src="data:image/png;base64,iVBORw0KGgoAAAA">'
        '<div style="display:none"><svg xmlns="http://www.w3.org/2000/svg" width="10" '
        'height="10"></svg></div>'
        "<script>console.error('boom'); undefined_function();</script>"
        "</body></html>"
    )
    result = browser_check.check(page)
    problems = "\n".join(result["problems"])
    assert "request for http://127.0.0.1:9/x.png" in problems
    assert "img #0 (remote) did not render" in problems
    assert "img #1 (broken) did not render" in problems
    assert "svg #0" in problems
    assert "console error: boom" in problems
    assert "undefined_function" in problems
