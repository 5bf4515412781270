"""``--decode gpu``: JPEGs decoded by torchvision onto the runner's device (here its CPU decoder,
whose pixels equal PIL's), PIL for the rest, and the infer pipeline around it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision.io  # noqa: F401  (imported once here: in mutmut's fork server, not in every mutant, ~2-4 s)
from click.testing import CliRunner
from PIL import Image

import fcn_deploy.infer.gpu_decode as devicedecode
from fcn_deploy.cli import cli
from fcn_deploy.infer.gpu_decode import decode_batch, read_encoded
from fcn_deploy.errors import ImageReadError, ImageTooLargeError, UsageError
from fcn_deploy.images import load_rgb
from fcn_deploy.infer.pipeline import run_inference
from fcn_deploy.runners.torch_runner import TorchRunner
from fcn_deploy.tiling import NumpyAssembler, TorchAssembler
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD

SMALL = (64, 96)


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg(path, rgb, orientation=None, mode="RGB"):
    img = Image.fromarray(rgb)
    if mode != "RGB":
        img = img.convert(mode)
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    img.save(path, format="JPEG", quality=90, **kwargs)
    return path


def test_every_exif_orientation_matches_pil(tmp_path):
    rgb = _rgb(37, 53)
    paths = [_jpeg(tmp_path / f"o{o}.jpg", rgb, o) for o in range(1, 9)]
    encoded = [read_encoded(p) for p in paths]
    assert [e.orientation for e in encoded] == list(range(1, 9))
    assert all(e.data is not None and e.pixels == 37 * 53 for e in encoded)
    for path, image in zip(paths, decode_batch(encoded, "cpu")):
        expected = load_rgb(path)  # PIL, EXIF applied
        assert image.shape == expected.shape and image.is_contiguous()
        np.testing.assert_array_equal(image.numpy(), expected)


@pytest.mark.parametrize("orientation", [0, 9])
def test_an_unknown_orientation_is_ignored_as_pil_does(tmp_path, orientation):
    path = _jpeg(tmp_path / f"o{orientation}.jpg", _rgb(21, 34), orientation)
    encoded = read_encoded(path)
    assert encoded.orientation == 1
    np.testing.assert_array_equal(decode_batch([encoded], "cpu")[0].numpy(), load_rgb(path))


def test_pil_decodes_what_the_device_decoder_does_not_take(tmp_path):
    rgb = _rgb(20, 30, 1)
    png = tmp_path / "a.png"
    Image.fromarray(rgb).save(png)
    gray = _jpeg(tmp_path / "gray.jpg", rgb, mode="L")
    cmyk = _jpeg(tmp_path / "cmyk.jpg", rgb, mode="CMYK")
    good = _jpeg(tmp_path / "good.jpg", rgb)
    encoded = [read_encoded(p) for p in (png, gray, cmyk, good)]
    assert [e.data is None for e in encoded] == [True, True, True, False]
    results = decode_batch(encoded, "cpu")
    assert [isinstance(r, np.ndarray) for r in results] == [True, True, True, False]
    for path, image in zip((png, gray, cmyk, good), results):
        np.testing.assert_array_equal(np.asarray(image), load_rgb(path))


def test_a_corrupt_jpeg_fails_alone_and_names_its_file(tmp_path):
    good = [_jpeg(tmp_path / f"g{i}.jpg", _rgb(24, 32, i)) for i in range(2)]
    data = good[0].read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(data[: len(data) // 2])
    encoded = [read_encoded(good[0]), read_encoded(bad), read_encoded(good[1])]
    first, broken, last = decode_batch(encoded, "cpu")
    assert isinstance(broken, ImageReadError) and str(bad) in str(broken) and "\n" not in str(broken)
    np.testing.assert_array_equal(first.numpy(), load_rgb(good[0]))
    np.testing.assert_array_equal(last.numpy(), load_rgb(good[1]))


def test_read_encoded_checks_before_reading(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    for path, text in ((tmp_path / "missing.jpg", "no such file"), (tmp_path, "is a directory"),
                       (tmp_path / "notes.jpg", "not an image PIL can decode")):
        with pytest.raises(ImageReadError) as exc:
            read_encoded(path)
        assert str(exc.value).startswith(f"{path}: {text}")  # the file named, as load_rgb does
    big = _jpeg(tmp_path / "big.jpg", _rgb(40, 50))
    with pytest.raises(ImageTooLargeError, match=r"big.jpg: too large, 50x40"):
        read_encoded(big, limit=40 * 50 - 1)
    assert read_encoded(big, limit=40 * 50).pixels == 2000


def test_a_bomb_header_is_refused_naming_the_given_limit(tmp_path, bomb_png):
    """A PNG declaring 30000x30000 (PIL refuses it at open, beyond twice its limit): the error
    names the file and the limit asked for, not the process-wide one."""
    bomb = bomb_png(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(ImageTooLargeError) as exc:
        read_encoded(bomb, limit=1000)
    assert str(exc.value) == f"{bomb}: too large, 900.0 MP exceeds the limit of 1000 pixels; raise it with --max-pixels"


def test_one_batched_device_decode_then_each_file_alone_after_a_failure(tmp_path, monkeypatch):
    """The calls of torchvision's decode_jpeg (recorded, then run): one call for all the JPEGs of
    a batch; after a failed batch one call per file; a lone corrupt file is not tried twice."""
    import torchvision.io as tvio

    real, calls = tvio.decode_jpeg, []

    def recording(data, **kwargs):
        calls.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(tvio, "decode_jpeg", recording)
    good = [_jpeg(tmp_path / f"g{i}.jpg", _rgb(24, 32, i)) for i in range(3)]
    png = tmp_path / "a.png"
    Image.fromarray(_rgb(5, 6)).save(png)
    data = good[0].read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(data[: len(data) // 2])
    results = decode_batch([read_encoded(p) for p in (good[0], png, good[1], good[2])], "cpu")
    assert calls == [3] and [isinstance(r, torch.Tensor) for r in results] == [True, False, True, True]
    calls.clear()
    results = decode_batch([read_encoded(p) for p in (good[0], bad, good[1])], "cpu")
    assert calls == [3, 1, 1, 1] and isinstance(results[1], ImageReadError)
    calls.clear()
    assert isinstance(decode_batch([read_encoded(bad)], "cpu")[0], ImageReadError) and calls == [1]


def test_batches_end_at_the_image_or_pixel_limit(tmp_path):
    e = read_encoded(_jpeg(tmp_path / "a.jpg", _rgb(10, 10)))
    assert not devicedecode.batch_ends([e] * (devicedecode.MAX_BATCH_IMAGES - 1))
    assert devicedecode.batch_ends([e] * devicedecode.MAX_BATCH_IMAGES)
    big = devicedecode.Encoded(e.path, e.data, 1, devicedecode.MAX_BATCH_PIXELS)
    assert devicedecode.batch_ends([big]) and not devicedecode.batch_ends([e])


def test_read_encoded_keeps_the_bytes_of_rgb_jpegs_only(tmp_path):
    plain = _jpeg(tmp_path / "plain.jpg", _rgb(12, 17))  # no EXIF at all: upright
    e = read_encoded(str(plain))
    assert e.path == plain and e.data == plain.read_bytes() and e.orientation == 1 and e.pixels == 12 * 17
    png = tmp_path / "a.png"
    Image.fromarray(_rgb(5, 6)).save(png)
    e = read_encoded(png)
    assert e.data is None and e.orientation == 1 and e.pixels == 30
    gray = read_encoded(_jpeg(tmp_path / "g.jpg", _rgb(5, 6), 6, mode="L"))  # PIL applies its EXIF
    assert gray.data is None and gray.orientation == 1


def test_decode_batch_gives_device_tensors_for_jpegs_and_pil_arrays_for_the_rest(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(_rgb(5, 6, 2)).save(png)
    encoded = [read_encoded(_jpeg(tmp_path / "a.jpg", _rgb(7, 9))), read_encoded(png)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision's deprecation warning is not the user's business
        jpeg, other = decode_batch(encoded, "cpu")
    assert isinstance(jpeg, torch.Tensor) and jpeg.dtype == torch.uint8 and jpeg.shape == (7, 9, 3)
    assert isinstance(other, np.ndarray) and other.shape == (5, 6, 3)
    assert decode_batch([], "cpu") == []
    only_png = decode_batch([read_encoded(png)], "cpu")  # no JPEG: no device decode
    np.testing.assert_array_equal(only_png[0], load_rgb(png))


def test_the_pixel_limit_reaches_the_pil_fallback(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(_rgb(10, 20)).save(png)
    encoded = read_encoded(png)  # read under the default limit
    (refused,) = decode_batch([encoded], "cpu", limit=199)
    assert isinstance(refused, ImageTooLargeError) and str(refused).startswith(f"{png}: too large, 20x10")
    (admitted,) = decode_batch([encoded], "cpu", limit=200)
    assert admitted.shape == (10, 20, 3)


def test_a_failed_batch_of_two_retries_each_file_on_the_device(tmp_path):
    good = _jpeg(tmp_path / "good.jpg", _rgb(24, 32))
    data = good.read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(data[: len(data) // 2])
    for order in ((good, bad), (bad, good)):
        results = decode_batch([read_encoded(p) for p in order], "cpu")
        image, broken = results if order[0] == good else results[::-1]
        assert isinstance(image, torch.Tensor)  # the device decoded it alone, PIL was not needed
        np.testing.assert_array_equal(image.numpy(), load_rgb(good))
        assert isinstance(broken, ImageReadError) and str(broken).startswith(f"{bad}: corrupt or truncated image")
    (alone,) = decode_batch([read_encoded(bad)], "cpu")
    assert isinstance(alone, ImageReadError) and str(bad) in str(alone)


def test_check_decode_accepts_cpu_always_and_gpu_with_the_torch_assembler():
    numpy_asm = NumpyAssembler((32, 32), 1, IMAGENET_MEAN, IMAGENET_STD)
    torch_asm = TorchAssembler((32, 32), 1, IMAGENET_MEAN, IMAGENET_STD, device="cpu")
    for asm in (numpy_asm, torch_asm, None):
        devicedecode.check_decode("cpu", asm)
    devicedecode.check_decode("gpu", torch_asm)
    for asm in (numpy_asm, None):
        with pytest.raises(UsageError) as exc:
            devicedecode.check_decode("gpu", asm)
        assert str(exc.value) == "--decode gpu needs a runner on a CUDA device, not cpu; use --decode cpu"
    with pytest.raises(UsageError) as exc:
        devicedecode.check_decode("GPU", torch_asm)
    assert str(exc.value) == "--decode must be one of cpu, gpu, not 'GPU'"
    assert devicedecode.DECODE_KINDS == ("cpu", "gpu")


def test_batch_ends_at_32_images_or_8_megapixels(tmp_path):
    path = tmp_path / "x.jpg"

    def enc(pixels):
        return devicedecode.Encoded(path, b"", 1, pixels)

    assert (devicedecode.MAX_BATCH_IMAGES, devicedecode.MAX_BATCH_PIXELS) == (32, 8_000_000)
    assert not devicedecode.batch_ends([])
    assert not devicedecode.batch_ends([enc(1)] * 31) and devicedecode.batch_ends([enc(1)] * 32)
    assert not devicedecode.batch_ends([enc(4_000_000), enc(3_999_999)])
    assert devicedecode.batch_ends([enc(4_000_000), enc(4_000_000)])
    assert devicedecode.batch_ends([enc(12_000_000)])


def test_as_host_copies_a_tensor_and_passes_an_array():
    arr = _rgb(3, 4)
    assert devicedecode.as_host(arr) is arr
    host = devicedecode.as_host(torch.from_numpy(arr.copy()))
    assert isinstance(host, np.ndarray) and host.dtype == np.uint8
    np.testing.assert_array_equal(host, arr)


@pytest.fixture(scope="module")
def small_runner(checkpoint_path):
    with TorchRunner(checkpoint_path, tile_hw=SMALL) as runner:
        yield runner


def test_infer_decode_gpu_writes_the_masks_of_the_cpu_path(small_runner, tmp_path, monkeypatch):
    """The --decode gpu pipeline (run on the CPU torch assembler) across several decode batches:
    the same mask bytes as PIL decoding with the numpy assembler; a corrupt JPEG fails alone."""
    monkeypatch.setattr(devicedecode, "MAX_BATCH_IMAGES", 2)
    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w, o) in enumerate([(70, 100, 1), (50, 130, 6), (64, 96, 3), (120, 90, 8), (33, 40, 1)]):
        _jpeg(src / f"p{i}.jpg", _rgb(h, w, i), o)
    Image.fromarray(_rgb(40, 70, 9)).save(src / "q.png")
    data = (src / "p0.jpg").read_bytes()
    (src / "torn.jpg").write_bytes(data[: len(data) // 2])
    outs = {}
    for decode, assembler in (("cpu", "numpy"), ("gpu", "torch")):
        out = tmp_path / decode
        summary = run_inference([src], out, runner=small_runner, batch_size=3, overlap=16, progress=False,
                                decode=decode, assembler=assembler)
        assert summary.images == 6 and len(summary.failed) == 1
        assert "torn.jpg" in summary.failed[0][0]
        outs[decode] = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != ".fcn-deploy-infer"}
        if decode == "gpu":
            assert summary.stages["read"] > 0 and summary.stages["decode"] > 0
    assert sorted(outs["gpu"]) == sorted(outs["cpu"]) and len(outs["cpu"]) == 6
    for name in outs["cpu"]:
        assert outs["gpu"][name] == outs["cpu"][name], name


def test_decode_gpu_without_a_cuda_runner_is_one_line(small_runner, checkpoint_path, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _jpeg(src / "a.jpg", _rgb(20, 30))
    with pytest.raises(UsageError, match="--decode gpu needs a runner on a CUDA device, not cpu"):
        run_inference([src], tmp_path / "out", runner=small_runner, overlap=16, decode="gpu", progress=False)
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(cli, ["infer", str(src), "-o", str(tmp_path / "o2"), "--backend", "torch",
                                   "--model", str(checkpoint_path), "--device", "cpu", "--decode", "gpu"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "error: --decode gpu needs a runner on a CUDA device" in res.output
    res = CliRunner().invoke(cli, ["infer", str(src), "--decode", "gpu", "--ray"])
    assert res.exit_code == 2 and "--decode gpu is for single-process infer" in res.output


@pytest.mark.gpu
def test_nvjpeg_decodes_close_to_pil_in_every_orientation(tmp_path):
    """nvJPEG (torchvision on CUDA): the displayed orientation of PIL, pixels within a few grey
    levels of libjpeg-turbo's (its IDCT and upsampling differ)."""
    rgb = np.asarray(Image.fromarray(_rgb(47, 63)).resize((630, 470)))
    paths = [_jpeg(tmp_path / f"o{o}.jpg", rgb, o) for o in range(1, 9)]
    results = decode_batch([read_encoded(p) for p in paths], "cuda")
    for path, image in zip(paths, results):
        assert image.is_cuda and image.dtype.is_floating_point is False
        expected = load_rgb(path).astype(np.int16)
        got = image.cpu().numpy().astype(np.int16)
        assert got.shape == expected.shape
        diff = np.abs(got - expected)
        assert diff.mean() < 1.0 and np.percentile(diff, 99.9) <= 8, (path.name, diff.mean(), diff.max())
