"""Image decoding (:mod:`fcn_deploy.images`): every PIL mode to 8-bit RGB, EXIF orientation, the
pixel limit checked before decoding, one-line errors naming the file, and normalisation."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn_deploy import images
from fcn_deploy.errors import ImageReadError, ImageTooLargeError, UsageError
from fcn_deploy.images import check_regular_file, check_size, image_errors, load_rgb, normalize


@pytest.fixture(autouse=True)
def _restore_the_pixel_limit():
    yield
    images.set_max_pixels(None)


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# -- the pixel limit ---------------------------------------------------------------------------
def test_default_limit_is_2_to_the_27():
    assert images.DEFAULT_MAX_PIXELS == 134_217_728 == images.max_pixels()
    assert Image.MAX_IMAGE_PIXELS == images.DEFAULT_MAX_PIXELS  # PIL's bomb check follows ours
    check_size("a.png", 11585, 11585)  # the largest square admitted
    with pytest.raises(ImageTooLargeError, match=r"a.png: too large, 11586x11586 \(134.2 MP\) exceeds the limit "
                                                 r"of 134.2 MP; raise it with --max-pixels 134235396$"):
        check_size("a.png", 11586, 11586)


def test_set_max_pixels_sets_ours_and_pils_and_resets():
    images.set_max_pixels("5000")  # the CLI may hand a string
    assert images.max_pixels() == 5000 and Image.MAX_IMAGE_PIXELS == 5000
    check_size("x.png", 50, 100)
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 5000 pixels"):
        check_size("x.png", 50, 101)
    images.set_max_pixels(1)  # the smallest limit
    assert images.max_pixels() == 1
    check_size("x.png", 1, 1)
    images.set_max_pixels(None)
    assert images.max_pixels() == images.DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("bad", [0, -3])
def test_set_max_pixels_refuses_less_than_one_and_keeps_the_limit(bad):
    images.set_max_pixels(700)
    with pytest.raises(UsageError) as exc:
        images.set_max_pixels(bad)
    assert str(exc.value) == f"--max-pixels must be at least 1, not {bad}"
    assert images.max_pixels() == 700 and Image.MAX_IMAGE_PIXELS == 700


@pytest.mark.parametrize("n, text", [(1, "1 pixels"), (99_999, "99999 pixels"), (100_000, "0.1 MP"),
                                     (1_050_000, "1.1 MP"), (12_345_678, "12.3 MP"), (900_000_000, "900.0 MP")])
def test_sizes_are_said_in_pixels_or_megapixels(n, text):
    assert images._megapixels(n) == text


def test_check_size_admits_the_limit_and_names_file_size_and_limit():
    check_size("p.jpg", 40, 25, limit=1000)  # exactly the limit
    with pytest.raises(ImageTooLargeError) as exc:
        check_size(Path("dir/p.jpg"), 41, 25, limit=1000)
    assert str(exc.value) == ("dir/p.jpg: too large, 41x25 (1025 pixels) exceeds the limit of 1000 pixels; "
                              "raise it with --max-pixels 1025")
    images.set_max_pixels(999)  # no limit given: the process-wide one
    with pytest.raises(ImageTooLargeError, match="40x25 .* of 999 pixels"):
        check_size("p.jpg", 40, 25)
    check_size("p.jpg", 40, 25, limit=1000)  # an explicit limit wins


# -- modes -------------------------------------------------------------------------------------
def _save(path, img, **kwargs):
    img.save(path, **kwargs)
    return path


def test_rgb_is_returned_as_it_is():
    img = Image.fromarray(_rgb(3, 4))
    assert images.to_rgb(img) is img


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_16_bit_is_scaled_from_its_full_range(mode):
    values = np.array([[257, 1000, 32768], [65278, 5000, 33025]], dtype=np.uint16)  # not min-max stretched
    byteorder = ">" if mode == "I;16B" else "<" if mode in ("I;16", "I;16L") else "="
    img = Image.frombytes(mode, (3, 2), values.astype(byteorder + "u2").tobytes())
    assert img.mode == mode
    rgb = np.asarray(images.to_rgb(img))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    expected = np.array([[1, 4, 128], [254, 19, 129]], dtype=np.uint8)  # rint(v / 65535 * 255); 128 by / 65536
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))


@pytest.mark.parametrize("mode, dtype", [("I", np.int32), ("F", np.float32)])
def test_32_bit_and_float_are_stretched_from_min_to_max(mode, dtype):
    values = np.array([[-10, 0, 10], [-9, 5, 6]], dtype=dtype)
    img = Image.fromarray(values, mode) if mode == "F" else Image.fromarray(values)
    assert img.mode == mode
    rgb = np.asarray(images.to_rgb(img))
    expected = np.rint((values.astype(np.float64) + 10) / 20 * 255).astype(np.uint8)  # 0, 128 (127.5), 255, ...
    assert expected.tolist() == [[0, 128, 255], [13, 191, 204]]
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))


def test_float_images_are_scaled_in_double_precision():
    """0.0019607844 * 255 is 0.50000003 in float64 (grey 1) but 0.5 in float32 (grey 0)."""
    x = np.float32(0.0019607844296842813)
    img = Image.fromarray(np.array([[0, x, 1]], np.float32), "F")
    assert np.asarray(images.to_rgb(img))[0, :, 0].tolist() == [0, 1, 255]


@pytest.mark.parametrize("mode", ["I", "F"])
def test_a_constant_32_bit_image_is_black(mode):
    img = Image.fromarray(np.full((2, 3), 7, dtype=np.int32 if mode == "I" else np.float32), mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0 / 0
        rgb = np.asarray(images.to_rgb(img))
    assert rgb.shape == (2, 3, 3) and not rgb.any()


def test_grayscale_palette_alpha_and_cmyk_keep_their_colours(tmp_path):
    rgb = _rgb(6, 7)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    assert load_rgb(_save(tmp_path / "l.png", Image.fromarray(gray))).tolist() == \
        np.repeat(gray[..., None], 3, axis=2).tolist()
    rgba = np.dstack([rgb, np.full((6, 7), 3, np.uint8)])  # nearly transparent: the colour is kept
    np.testing.assert_array_equal(load_rgb(_save(tmp_path / "rgba.png", Image.fromarray(rgba))), rgb)
    la = Image.fromarray(gray).convert("LA")
    np.testing.assert_array_equal(load_rgb(_save(tmp_path / "la.png", la)), np.repeat(gray[..., None], 3, axis=2))
    cmyk = _save(tmp_path / "c.tif", Image.fromarray(rgb).convert("CMYK"))
    with Image.open(cmyk) as img:
        assert img.mode == "CMYK"
        np.testing.assert_array_equal(load_rgb(cmyk), np.asarray(img.convert("RGB")))


def test_a_palette_with_transparency_is_decoded_without_a_warning(tmp_path):
    """A palette PNG with per-entry alpha (tRNS): its colours, and no PIL warning per image."""
    img = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8), "P")
    img.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120])
    path = _save(tmp_path / "p.png", img, transparency=bytes([0, 255, 128, 128]))
    with Image.open(path) as check:
        assert check.mode == "P" and isinstance(check.info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would be printed once per image
        rgb = load_rgb(path)
    assert rgb.tolist() == [[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 120]]]


def test_16_bit_png_through_load_rgb(tmp_path):
    values = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5957)  # 0 .. 65527
    path = _save(tmp_path / "s.png", Image.fromarray(values))
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    rgb = load_rgb(path)
    np.testing.assert_array_equal(rgb[..., 0], np.rint(values / 65535 * 255).astype(np.uint8))
    assert (rgb == rgb[..., :1]).all()


# -- load_rgb ----------------------------------------------------------------------------------
def _jpeg_pair(tmp_path, orientation):
    """The same JPEG data with EXIF orientation 1 and ``orientation``."""
    rgb = _rgb(9, 14, 3)
    paths = []
    for o in (1, orientation):
        exif = Image.Exif()
        exif[0x0112] = o
        paths.append(_save(tmp_path / f"o{o}.jpg", Image.fromarray(rgb), format="JPEG", quality=95, exif=exif))
    return paths


@pytest.mark.parametrize("orientation, turn", [(3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)),
                                               (8, lambda a: np.rot90(a, 1)), (2, lambda a: a[:, ::-1])])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    upright, turned = _jpeg_pair(tmp_path, orientation)
    np.testing.assert_array_equal(load_rgb(turned), turn(load_rgb(upright)))


def test_load_rgb_returns_a_writable_uint8_copy(tmp_path):
    rgb = _rgb(5, 8)
    path = _save(tmp_path / "a.png", Image.fromarray(rgb))
    out = load_rgb(str(path))
    assert out.dtype == np.uint8 and out.shape == (5, 8, 3) and out.flags.writeable and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns above its limit, 599
def test_load_rgb_refuses_by_the_given_or_the_process_limit(tmp_path):
    path = _save(tmp_path / "a.png", Image.fromarray(_rgb(20, 30)))
    with pytest.raises(ImageTooLargeError, match=r"a.png: too large, 30x20 \(600 pixels\) exceeds the limit of 599"):
        load_rgb(path, limit=599)
    assert load_rgb(path, limit=600).shape == (20, 30, 3)
    images.set_max_pixels(599)
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 599 pixels"):
        load_rgb(path)
    assert load_rgb(path, limit=600).shape == (20, 30, 3)


def test_load_rgb_errors_name_the_file_in_one_line(tmp_path):
    cases = {tmp_path / "missing.png": "no such file", tmp_path: "is a directory, not an image"}
    (tmp_path / "notes.png").write_text("just text")
    cases[tmp_path / "notes.png"] = "not an image PIL can decode"
    data = (_save(tmp_path / "whole.jpg", Image.fromarray(_rgb(64, 64)), format="JPEG")).read_bytes()
    (tmp_path / "torn.jpg").write_bytes(data[: len(data) // 3])
    cases[tmp_path / "torn.jpg"] = "corrupt or truncated image"
    for path, text in cases.items():
        with pytest.raises(ImageReadError) as exc:
            load_rgb(path)
        assert str(exc.value).startswith(f"{path}: {text}") and "\n" not in str(exc.value)
        assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageReadError) as exc:
        load_rgb(fifo)  # would block forever if opened
    assert str(exc.value) == f"{fifo}: not a regular file (a FIFO, socket or device), not an image"
    with pytest.raises(IsADirectoryError):
        check_regular_file(tmp_path)
    check_regular_file(_save(tmp_path / "a.png", Image.fromarray(_rgb(2, 2))))


@pytest.mark.parametrize("exc, message", [
    (Image.DecompressionBombError("Image size (900000000 pixels) exceeds limit"),
     "x.png: too large, 900.0 MP exceeds the limit of 0.5 MP; raise it with --max-pixels"),
    (Image.DecompressionBombError("no size said"),
     "x.png: too large, more pixels exceeds the limit of 0.5 MP; raise it with --max-pixels"),
    (MemoryError(), "x.png: too large to decode in the memory available"),
    (SyntaxError("bad"), "x.png: corrupt or truncated image (bad)"),
    (ValueError("worse"), "x.png: corrupt or truncated image (worse)"),
])
def test_image_errors_say_what_failed(exc, message):
    with pytest.raises(ImageReadError) as got:
        with image_errors(Path("x.png"), limit=500_000):
            raise exc
    assert str(got.value) == message
    assert isinstance(got.value, ImageTooLargeError) == message.startswith("x.png: too large")


def test_a_bomb_header_names_the_limit_given(tmp_path, bomb_png):
    """A PNG declaring 30000x30000 (PIL refuses it at open, beyond twice its own limit)."""
    bomb = bomb_png(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(ImageTooLargeError) as exc:
        load_rgb(bomb, limit=1000)
    assert str(exc.value) == f"{bomb}: too large, 900.0 MP exceeds the limit of 1000 pixels; raise it with --max-pixels"


def test_a_bomb_header_is_refused_by_the_process_limit(tmp_path):
    images.set_max_pixels(100)
    path = _save(tmp_path / "b.png", Image.fromarray(np.zeros((20, 20), np.uint8)))  # 400 > 2 * 100: PIL's error
    with pytest.raises(ImageTooLargeError) as exc:
        load_rgb(path)
    assert str(exc.value) == f"{path}: too large, 400 pixels exceeds the limit of 100 pixels; raise it with --max-pixels"


# -- normalize ---------------------------------------------------------------------------------
def test_normalize_is_x_over_255_minus_mean_over_std():
    rgb = _rgb(4, 5)
    before = rgb.copy()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    chw = normalize(rgb, mean, std)
    assert chw.dtype == np.float32 and chw.shape == (3, 4, 5) and chw.flags.c_contiguous
    expected = (rgb.transpose(2, 0, 1) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(chw, expected, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(rgb, before)  # the input is not touched


def test_normalize_is_the_float32_arithmetic_of_the_assembler():
    """Bit for bit the float32 ``x * (1 / (255 * std)) - mean / std`` that the tile assemblers use
    (their tiles equal normalize()'s), for float64 mean and std too."""
    rgb = _rgb(6, 7, 5)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    std32 = np.asarray(std, np.float32).reshape(3, 1, 1)
    scale = (np.float32(1.0) / (np.float32(255.0) * std32)).astype(np.float32)
    shift = (np.asarray(mean, np.float32).reshape(3, 1, 1) / std32).astype(np.float32)
    expected = rgb.transpose(2, 0, 1).astype(np.float32) * scale - shift
    np.testing.assert_array_equal(normalize(rgb, mean, std), expected)
    np.testing.assert_array_equal(normalize(rgb, np.array(mean), np.array(std)), expected)
