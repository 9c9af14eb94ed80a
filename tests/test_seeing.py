"""Seeing inside a network: images in (cnnc.viz.images), normalization declared by programs,
class names (--labels), every layer's activations (Model.activations) and the pictures of
cnnc viz (cnnc.viz.maps)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnc
from cnnc import preprocess
from cnnc.cli import main
from cnnc.errors import CnncError, InputError, LayerError, UsageError
from cnnc.viz import images, labels, maps

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

GREY = """network grey(image: 1x8x8 [normalize=none]) {
    c1: conv(4, 3, pad=1) -> relu -> maxpool(2)
    f: fc(10) -> softmax
}
"""
RGB = """network rgb(image: 3x8x8 [normalize=imagenet]) {
    c1: conv(6, 3, pad=1) -> relu
    gap -> f: fc(3)
}
"""


def pixels(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(path: Path, array: np.ndarray, mode: str, **options) -> Path:
    Image.fromarray(array, mode).save(path, **options)
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- images in -----------------------------------------------------------------------------


def test_a_grey_png_of_the_input_size_is_its_pixels_over_255(tmp_path):
    a = pixels(8, 8, 1)
    x = images.load_images(save(tmp_path / "g.png", a, "L"), (1, 8, 8))
    assert x.dtype == np.float32 and x.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(x[0, 0], a.astype(np.float32) / 255)


def test_an_rgb_png_becomes_channels_first(tmp_path):
    a = pixels(8, 8, 3)
    x = images.load_images(save(tmp_path / "c.png", a, "RGB"), (3, 8, 8))
    np.testing.assert_array_equal(x[0], a.transpose(2, 0, 1).astype(np.float32) / 255)


def test_an_rgb_image_for_a_grey_network_is_converted_to_luminance(tmp_path):
    a = pixels(8, 8, 3)
    x = images.load_images(save(tmp_path / "c.png", a, "RGB"), (1, 8, 8))
    # Pillow's L: (299 R + 587 G + 114 B) / 1000, rounded.
    luma = Image.fromarray(a, "RGB").convert("L")
    np.testing.assert_array_equal(x[0, 0], np.asarray(luma, np.float32) / 255)


def test_transparent_pixels_of_an_rgba_png_count_as_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)  # black, fully transparent...
    a[:4, :, 3] = 255  # ...but the top half is opaque black
    x = images.load_images(save(tmp_path / "t.png", a, "RGBA"), (3, 8, 8))
    assert (x[0, :, :4] == 0).all()
    assert (x[0, :, 4:] == 1).all()


def test_a_palette_png_reads_as_its_colours(tmp_path):
    a = pixels(8, 8, 3)
    path = tmp_path / "p.png"
    paletted = Image.fromarray(a, "RGB").quantize(16)
    paletted.save(path)
    x = images.load_images(path, (3, 8, 8))
    expected = np.asarray(paletted.convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(x[0], expected)


def test_a_bmp_is_read_exactly_and_a_jpeg_within_its_compression(tmp_path):
    a = np.repeat(np.repeat(pixels(2, 2, 3), 4, axis=0), 4, axis=1)  # flat 4×4 blocks
    bmp = images.load_images(save(tmp_path / "a.bmp", a, "RGB"), (3, 8, 8))
    np.testing.assert_array_equal(bmp[0], a.transpose(2, 0, 1) / np.float32(255))
    jpg = images.load_images(
        save(tmp_path / "a.jpg", a, "RGB", quality=100, subsampling=0), (3, 8, 8)
    )
    assert np.abs(jpg - bmp).max() < 0.05


def test_a_16_bit_grey_png_keeps_its_range(tmp_path):
    a = np.array([[0, 65535], [32768, 16384]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    x = images.load_images(path, (1, 2, 2))
    np.testing.assert_allclose(x[0, 0], a / 65535, atol=1e-6)


def pil_bilinear(src: np.ndarray, out: int, axis: int) -> np.ndarray:
    """Pillow's antialiased bilinear resampling along one axis, in floating point (the
    triangle filter widened by the scale when shrinking), rounded to 8 bits as Pillow
    stores each pass."""
    size = src.shape[axis]
    scale = size / out
    support = max(scale, 1.0)
    weights = np.zeros((out, size))
    for i in range(out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), size)
        j = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) / support))
        weights[i, lo:hi] = w / w.sum()
    moved = np.moveaxis(src.astype(np.float64), axis, 0)
    result = np.tensordot(weights, moved, axes=(1, 0))
    return np.clip(np.round(np.moveaxis(result, 0, axis)), 0, 255)


def test_resize_of_the_shorter_side_then_centre_crop_matches_a_numpy_reference(tmp_path):
    a = pixels(37, 50, 1, seed=3)  # landscape: the height becomes 8, the width int(8*50/37)
    x = images.load_images(save(tmp_path / "r.png", a, "L"), (1, 8, 8))
    assert images.resized_size(50, 37, 8, 8) == (10, 8)
    reference = pil_bilinear(pil_bilinear(a, 10, axis=1), 8, axis=0)[:, 1:9]
    assert np.abs(x[0, 0] * 255 - reference).max() <= 1  # Pillow's fixed point: one level


def test_an_image_of_the_right_height_is_only_cropped_in_the_centre(tmp_path):
    a = pixels(8, 12, 1)
    x = images.load_images(save(tmp_path / "w.png", a, "L"), (1, 8, 8))
    np.testing.assert_array_equal(x[0, 0], a[:, 2:10] / np.float32(255))
    b = pixels(13, 8, 1)  # an odd margin of 5 rounds as torchvision's CenterCrop: 2 on top
    y = images.load_images(save(tmp_path / "t.png", b, "L"), (1, 8, 8))
    np.testing.assert_array_equal(y[0, 0], b[2:10] / np.float32(255))


def test_a_non_square_input_is_covered_then_cropped():
    assert images.resized_size(100, 100, 4, 8) == (8, 8)  # the width needs more scale
    assert images.resized_size(100, 50, 4, 8) == (8, 4)
    assert images.crop_box(8, 8, 4, 8) == (0, 2, 8, 6)


def test_imagenet_normalization_subtracts_its_mean_and_divides_by_its_std():
    x = np.full((1, 3, 2, 2), 0.5, np.float32)
    y = images.normalize(x, "imagenet")
    expected = (0.5 - np.array(preprocess.IMAGENET_MEAN)) / np.array(preprocess.IMAGENET_STD)
    np.testing.assert_allclose(y[0, :, 0, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(images.normalize(x, "none"), x)
    np.testing.assert_allclose(images.normalize(x, "0.25,0.5"), np.full_like(x, 0.5))
    per_channel = images.normalize(x, "0/0.5/1,1/1/2")
    np.testing.assert_allclose(per_channel[0, :, 0, 0], [0.5, 0.0, -0.25])
    np.testing.assert_allclose(images.normalize(x, "none", invert=True), 1 - x)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("imagenett", "is not a normalization"),
        ("a,b", "not numbers"),
        ("0.5,0", "must be above zero"),
        ("0.5,nan", "must be finite"),
    ],
)
def test_a_bad_normalize_option_is_a_usage_error(text, message):
    with pytest.raises(UsageError, match=message):
        preprocess.parse_option(text)


def test_a_normalization_of_the_wrong_channel_count_is_refused():
    with pytest.raises(CnncError, match="has 3 mean values for an input of 1 channel"):
        images.normalize(np.zeros((1, 1, 2, 2), np.float32), "imagenet")


def test_a_folder_is_a_batch_in_sorted_order_of_names(tmp_path):
    for name, value in (("b.png", 20), ("a.png", 10), ("c.bmp", 30)):
        save(tmp_path / name, np.full((8, 8), value, np.uint8), "L")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in images.image_files([tmp_path])] == ["a.png", "b.png", "c.bmp"]
    x = images.load_images(tmp_path, (1, 8, 8))
    np.testing.assert_allclose(x[:, 0, 0, 0], np.array([10, 20, 30]) / 255)


def test_an_empty_folder_is_an_error(tmp_path):
    with pytest.raises(InputError, match="holds no image"):
        images.load_images(tmp_path, (1, 8, 8))


def test_an_input_of_two_channels_or_one_dimension_cannot_take_an_image(tmp_path):
    path = save(tmp_path / "g.png", pixels(8, 8, 1), "L")
    with pytest.raises(InputError, match=r"1 \(grey\) or 3 \(RGB\) channels; .* has 2"):
        images.load_images(path, (2, 8, 8))
    with pytest.raises(InputError, match="channels × height × width"):
        images.load_images(path, (1, 64))


def test_without_pillow_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(UsageError, match="needs Pillow") as e:
        images.load_images(tmp_path / "x.png", (1, 8, 8))
    assert e.value.hint == "pip install 'cnnc[viz]'"


# ---- normalization declared by a program --------------------------------------------------


def test_a_program_declares_the_normalization_of_its_input():
    assert cnnc.compile(RGB).graph.preprocess == {"image": preprocess.IMAGENET}
    assert cnnc.compile(GREY).graph.preprocess == {"image": preprocess.NONE}
    numbers = cnnc.compile(GREY.replace("normalize=none", "mean=0.5, std=(0.25)"))
    assert numbers.graph.preprocess["image"].mean == (0.5,)
    assert numbers.graph.preprocess["image"].std == (0.25,)
    plain = cnnc.compile(GREY.replace(" [normalize=none]", ""))
    assert plain.graph.preprocess == {}


def test_the_torchvision_examples_say_imagenet_and_digits_says_none():
    for name in ("resnet18", "vgg16", "mobilenet_v2"):
        text = (EXAMPLES / f"{name}.cnn").read_text()
        assert cnnc.parse(text).networks[-1].inputs[0].options[0].value.id == "imagenet"
    digits = cnnc.compile(EXAMPLES / "digits.cnn")
    assert digits.graph.preprocess == {"image": preprocess.NONE}


@pytest.mark.parametrize(
    ("options", "message", "column"),
    [
        ("[normalise=none]", "unknown input option 'normalise'", 25),
        ("[normalize=imagenett]", "normalize= takes imagenet or none", 35),
        ("[normalize=none, normalize=none]", "'normalize' is given twice", 41),
        ("[mean=0.5]", "input option std= is missing", 25),
        ("[mean=0.5, std=0]", "must be above zero", 35),
        ("[mean=x, std=1]", "mean= takes a number or numbers", 30),
        ("[normalize=none, mean=1]", "use one or the other", 25),
        ("[mean=(0.5, 0.5), std=1]", "has 2 mean values for an input of 1 channel", 25),
        ("[normalize=imagenet]", "has 3 mean values for an input of 1 channel", 25),
    ],
)
def test_a_mistake_in_input_options_is_reported_at_its_place(options, message, column):
    source = f"network n(image: 1x8x8 {options}) {{ conv(4, 3) }}"
    with pytest.raises(LayerError, match=message) as e:
        cnnc.compile(source)
    assert (e.value.location.line, e.value.location.col) == (1, column)


def test_an_empty_option_list_is_a_syntax_error():
    with pytest.raises(cnnc.errors.ParseError, match="expected a name"):
        cnnc.parse("network n(image: 1x8x8 []) { conv(4, 3) }")


# ---- cnnc run --input IMAGE and --labels -------------------------------------------------


def test_cnnc_run_reads_a_folder_names_each_item_and_prints_labels(tmp_path, capsys):
    program = tmp_path / "grey.cnn"
    program.write_text(GREY)
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in (2, 0, 1):
        save(folder / f"{i}.png", pixels(16, 16, 1, seed=i), "L")
    code, out, err = cli(capsys, "run", program, "--input", folder, "--labels", "digits")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "grey on input [3, 1, 8, 8] (numpy)"
    assert lines[1] == (
        "  %image: 3 images, resized and cropped to 8x8, normalize none (the program's)"
    )
    assert [line.split(":")[0] for line in lines[3:6]] == [
        "  item 0 (0.png)",
        "  item 1 (1.png)",
        "  item 2 (2.png)",
    ]
    model = cnnc.compile(program)
    y = model.run(images.load_images(folder, (1, 8, 8)))
    names = labels.load_labels("digits")
    best = int(y[0].argmax())
    assert f"class {best} {names[best]}: {y[0, best]:.4g}" in lines[3]


def test_normalize_on_the_command_line_overrides_the_program(tmp_path, capsys):
    program = tmp_path / "rgb.cnn"
    program.write_text(RGB)
    path = save(tmp_path / "c.png", pixels(8, 8, 3), "RGB")
    ys = {}
    for option in ([], ["--normalize", "none"]):
        out_file = tmp_path / f"y{len(option)}.npy"
        code, _out, _ = cli(capsys, "run", program, "--input", path, "-o", out_file, *option)
        assert code == 0
        ys[len(option)] = np.load(out_file)
    assert "normalize imagenet (the program's)" in cli(capsys, "run", program, "--input", path)[1]
    model = cnnc.compile(program)
    np.testing.assert_allclose(ys[0], model.run(images.load_images(path, (3, 8, 8), "imagenet")))
    np.testing.assert_allclose(ys[2], model.run(images.load_images(path, (3, 8, 8), "none")))


def test_several_image_files_are_one_batch_in_the_order_given(tmp_path, capsys):
    program = tmp_path / "grey.cnn"
    program.write_text(GREY)
    b = save(tmp_path / "b.png", pixels(8, 8, 1, 1), "L")
    a = save(tmp_path / "a.png", pixels(8, 8, 1, 2), "L")
    code, out, _ = cli(capsys, "run", program, "--input", b, "--input", a, "--invert")
    assert code == 0
    assert "item 0 (b.png)" in out and "item 1 (a.png)" in out and "inverted" in out


def test_normalize_without_an_image_is_a_usage_error(tmp_path, capsys):
    program = tmp_path / "grey.cnn"
    program.write_text(GREY)
    code, _, err = cli(capsys, "run", program, "--normalize", "none")
    assert code == 1 and "apply to images given with --input" in err


def test_the_built_in_labels_are_imagenet_and_the_digits():
    imagenet = labels.load_labels("imagenet")
    assert len(imagenet) == 1000 and len(set(imagenet)) == 1000
    assert (imagenet[0], imagenet[281], imagenet[999]) == ("tench", "tabby", "toilet tissue")
    assert labels.load_labels("digits") == [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"
    ]  # fmt: skip


def test_a_label_file_has_one_name_per_line(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("cat\ndog \nbird\n\n")
    assert labels.load_labels(path) == ["cat", "dog", "bird"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cat\n\ndog\n", "line 2 of the label file is empty"),
        ("\n\n", "holds no class name"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_a_bad_label_file_is_one_error(tmp_path, text, message):
    path = tmp_path / "names.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UsageError, match=message):
        labels.load_labels(path)


def test_labels_that_do_not_match_the_classes_are_refused(tmp_path, capsys):
    program = tmp_path / "rgb.cnn"
    program.write_text(RGB)
    code, _, err = cli(capsys, "run", program, "--labels", "digits")
    assert code == 1
    assert err.splitlines()[-2] == "digits: error: 10 class names for a network of 3 classes"
    code, _, err = cli(capsys, "run", program, "--labels", tmp_path / "missing.txt")
    assert code == 1 and "label file not found" in err


# ---- Model.activations --------------------------------------------------------------------


def test_activations_hold_the_inputs_then_every_node_output_in_graph_order():
    model = cnnc.compile(GREY, opt_level=0)
    x = model.random_input(2)
    values = model.activations(x)
    assert list(values) == ["image"] + [n.outputs[0].name for n in model.graph.nodes]
    assert values["image"] is x
    np.testing.assert_allclose(values["f.softmax"], model.run(x), rtol=1e-6)
    assert values["c1"].shape == (2, 4, 8, 8)
    np.testing.assert_array_equal(values["c1.relu"], np.maximum(values["c1"], 0))


def test_activations_check_their_inputs():
    model = cnnc.compile(GREY)
    with pytest.raises(InputError):
        model.activations(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="takes 1 input"):
        model.activations()


# ---- pictures ----------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    image.verify()  # a valid PNG: chunks and checksums
    return Image.open(io.BytesIO(data)).size


def test_layer_pngs_draws_every_layer_the_kernels_and_the_prediction():
    model = cnnc.compile(GREY, opt_level=0)
    pngs = maps.layer_pngs(model, model.random_input(2), labels=labels.load_labels("digits"))
    values = model.activations(model.random_input(2))
    assert list(pngs) == [*values, maps.KERNELS, maps.PREDICTION]
    for data in pngs.values():
        assert data.startswith(b"\x89PNG")
        png_size(data)
    # c1: 4 channels of 8×8, upscaled 8 times to 64 pixels, in a 2×2 grid with 2-pixel gaps.
    width, height = png_size(pngs["c1"])
    assert width >= 2 * 64 + maps.GAP and height > 2 * 64 + maps.GAP


def test_a_tile_is_its_channel_scaled_to_its_own_range_and_upscaled():
    value = np.zeros((1, 2, 3), np.float32)
    value[0, 1, 2] = 5.0
    image = maps.feature_map_image("m", value)
    grid = maps._grid([maps._scaled(value[0])], 1, 2)
    assert grid.size == (6, 4)
    cells = np.asarray(grid)
    np.testing.assert_array_equal(cells[2:, 4:], np.broadcast_to(maps.VIRIDIS[255], (2, 2, 3)))
    np.testing.assert_array_equal(cells[0, 0], maps.VIRIDIS[0])
    assert image.width >= 3 * maps._scale_for(2, 3)


def test_a_one_dimensional_network_and_its_fc_layers_are_drawn():
    model = cnnc.compile(
        "network sig(signal: 2x32) { c: conv(3, 5, pad=2) -> relu\n f: fc(300) }", opt_level=0
    )
    pngs = maps.layer_pngs(model, model.random_input())
    assert set(pngs) == {"signal", "c", "c.relu", "f.flatten", "f"}  # no 2-D kernels
    for data in pngs.values():
        png_size(data)


def test_the_kernels_of_an_rgb_network_are_colour_tiles():
    model = cnnc.compile(RGB, opt_level=0)
    name, weight = maps.first_conv_kernels(model)
    assert name == "c1" and weight.shape == (6, 3, 3, 3)
    image = maps.kernels_image(name, weight)
    assert image.mode == "RGB"


def test_an_unknown_layer_is_named_with_the_close_ones():
    model = cnnc.compile(GREY, opt_level=0)
    with pytest.raises(UsageError, match=r"no layer named 'c1\.rel'") as e:
        maps.layer_pngs(model, model.random_input(), layers=["c1.rel"])
    assert "did you mean c1.relu" in e.value.hint


def test_cnnc_viz_writes_one_png_per_layer_and_leaves_other_files(tmp_path, capsys):
    program = tmp_path / "grey.cnn"
    program.write_text(GREY)
    image = save(tmp_path / "d.png", pixels(16, 16, 1), "L")
    folder = tmp_path / "out" / "viz"
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("kept")
    (folder / "00_image.png").write_bytes(b"old")
    code, out, err = cli(capsys, "viz", program, "--input", image, "-o", folder)
    assert code == 0, err
    expected = [
        "00_image.png",
        "01_c1.png",
        "02_c1.relu.png",
        "03_c1.maxpool.png",
        "04_f.flatten.png",
        "05_f.png",
        "06_f.softmax.png",
        "kernels.png",
        "prediction.png",
    ]
    assert out.splitlines()[-1] == f"wrote 9 pictures to {folder}: " + ", ".join(expected)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*expected, "mine.txt"])
    assert (folder / "mine.txt").read_text() == "kept"
    for name in expected:
        png_size((folder / name).read_bytes())


def test_cnnc_viz_creates_its_folder_and_draws_only_the_layers_asked(tmp_path, capsys):
    program = tmp_path / "grey.cnn"
    program.write_text(GREY)
    image = save(tmp_path / "d.png", pixels(8, 8, 1), "L")
    folder = tmp_path / "new"
    code, _out, _ = cli(capsys, "viz", program, "--input", image, "--layers", "c1,f", "-o", folder)
    assert code == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "00_c1.png",
        "01_f.png",
        "kernels.png",
        "prediction.png",
    ]


def test_cnnc_viz_refuses_a_file_as_its_folder_and_an_unknown_layer(tmp_path, capsys):
    program = tmp_path / "grey.cnn"
    program.write_text(GREY)
    image = save(tmp_path / "d.png", pixels(8, 8, 1), "L")
    code, _, err = cli(capsys, "viz", program, "--input", image, "-o", image)
    assert code == 1 and "is not a folder" in err
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli(
        capsys, "viz", program, "--input", image, "--layers", "nope", "-o", tmp_path / "v"
    )
    assert code == 1 and "has no layer named 'nope'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_eval_names_the_classes_of_its_per_class_lines():
    model = cnnc.compile(RGB)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3, 8, 8)).astype(np.float32)
    y = np.arange(12) % 3
    report = cnnc.evaluate(model, (x, y), split="all")
    lines = report.render(["cat", "dog", "bird"]).splitlines()
    per_class = lines[lines.index("per class:") + 1 :][:3]
    assert [line.split(":")[0] for line in per_class] == [
        "  class 0 cat ",
        "  class 1 dog ",
        "  class 2 bird",
    ]
    assert report.render().splitlines()[3].startswith("  class 0: ")


def test_an_onnx_model_carries_the_normalization_of_its_program(tmp_path):
    source = RGB.replace("normalize=imagenet", "mean=(0.1234567891, 0.5, -1), std=0.3")
    cnnc.compile(source).to_onnx(tmp_path / "n.onnx")
    loaded = cnnc.load(tmp_path / "n.onnx").graph.preprocess["image"]
    assert (loaded.mean, loaded.std) == ((0.1234567891, 0.5, -1.0), (0.3,))
    cnnc.compile(RGB).to_onnx(tmp_path / "i.onnx")
    assert cnnc.load(tmp_path / "i.onnx").graph.preprocess == {"image": preprocess.IMAGENET}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("cnnc.normalize.image", "imagenett", "is not a normalization"),
        ("cnnc.normalize.image", "0.5/0.5,1", "has 2 mean values for an input of 3 channels"),
        ("cnnc.normalize.mask", "none", "names no image input"),
    ],
)
def test_a_bad_normalization_in_onnx_metadata_is_one_error(tmp_path, key, value, message):
    import onnx

    proto = cnnc.compile(RGB).to_onnx()
    onnx.helper.set_model_props(proto, {key: value})
    onnx.save(proto, tmp_path / "bad.onnx")
    with pytest.raises(cnnc.errors.ModelFileError, match=message) as e:
        cnnc.load(tmp_path / "bad.onnx")
    assert e.value.where == str(tmp_path / "bad.onnx")


def test_compiling_and_running_on_arrays_never_import_pillow(tmp_path):
    import subprocess

    program = tmp_path / "grey.cnn"
    program.write_text(GREY)
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    script = (
        "import sys; from cnnc.cli import main; "
        f"assert main(['run', {str(program)!r}, '--input', {str(tmp_path / 'x.npy')!r}]) == 0; "
        f"assert main(['compile', {str(program)!r}, '-o', {str(tmp_path / 'g.onnx')!r}]) == 0; "
        "assert 'PIL' not in sys.modules, 'Pillow was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_long_signal_is_averaged_to_at_most_1024_cells_a_row():
    value = np.arange(2 * 5000, dtype=np.float32).reshape(2, 5000)
    image = maps.feature_map_image("long", value)
    assert image.width <= 1024 + 2 * maps.MARGIN + 10
    nan = maps.feature_map_image("nan", np.full(1000, np.nan, np.float32))
    assert nan.width > 0
