"""The pieces of ``fcn-deploy serve`` that need no Ray: request checks, decoding from bytes,
answers and error bodies (:mod:`fcn_deploy.serve.api`), a replica's work on a real small runner
(:mod:`fcn_deploy.serve.core`), the metrics exposition. The server itself, over HTTP:
tests/test_serve.py."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fcn_deploy.errors import (
    BadRequestError,
    PayloadTooLargeError,
    ServerBusyError,
    UnsupportedMediaTypeError,
    UsageError,
)
from fcn_deploy.serve import api
from fcn_deploy.serve.api import ServeSettings


@pytest.fixture(autouse=True)
def _default_pixel_limit():
    """A replica sets this process's pixel limit (and PIL's) from its settings: put it back."""
    from fcn_deploy import images

    yield
    images.set_max_pixels(None)


def _png(rgb: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, mode).save(buf, "PNG")
    return buf.getvalue()


def test_import_fcn_deploy_serve_imports_no_ray():
    code = "import sys, fcn_deploy, fcn_deploy.serve, fcn_deploy.cli; print('ray' in sys.modules, 'fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("content_type", [None, "", "image/jpeg", "IMAGE/PNG; charset=x", "application/octet-stream"])
def test_image_media_types_are_taken(content_type):
    assert api.check_headers(content_type, None, "10", 100) == 10


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "multipart/form-data; boundary=x",
                                          "image/svg+xml", "application/x-www-form-urlencoded"])
def test_other_media_types_are_415(content_type):
    with pytest.raises(UnsupportedMediaTypeError) as err:
        api.check_headers(content_type, None, None, 100)
    assert content_type.split(";")[0] in str(err.value)


def test_encoding_and_length_checks():
    with pytest.raises(UnsupportedMediaTypeError, match="gzip"):
        api.check_headers("image/png", "gzip", None, 100)
    assert api.check_headers("image/png", "identity", None, 100) is None
    with pytest.raises(PayloadTooLargeError, match="101 bytes, the limit is 100"):
        api.check_headers("image/png", None, "101", 100)
    for bad in ("abc", "-1"):
        with pytest.raises(BadRequestError):
            api.check_headers("image/png", None, bad, 100)


def test_query_takes_only_output():
    assert api.parse_query([]) == "mask"
    assert api.parse_query([("output", "JSON")]) == "json"
    for items, match in (([("image", "/etc/passwd")], "unknown query parameter 'image'"),
                         ([("output", "json"), ("output", "mask")], "twice"),
                         ([("output", "../x")], "not one of")):
        with pytest.raises(BadRequestError, match=match):
            api.parse_query(items)


def test_probe_refuses_before_decoding(bomb_png, tmp_path):
    bomb = bomb_png(tmp_path / "b.png", 30000, 30000).read_bytes()
    with pytest.raises(PayloadTooLargeError, match="900000000 pixels"):
        api.probe_image(bomb, 1 << 25)
    just_over = bomb_png(tmp_path / "c.png", 4097, 4096).read_bytes()
    with pytest.raises(PayloadTooLargeError, match="4097x4096"):
        api.probe_image(just_over, 1 << 24)
    assert api.probe_image(just_over, 4097 * 4096).pixels == 4097 * 4096
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    for data, match in ((b"", "empty"), (b"hello", "not an image"), (eps, "not an image")):
        with pytest.raises(BadRequestError, match=match):
            api.probe_image(data, 1 << 25)


def test_decode_is_load_rgb_of_the_same_file(tmp_path):
    from fcn_deploy.images import load_rgb

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", exif=exif)
    files = {"rot.jpg": buf.getvalue(), "gray.png": _png(rgb[..., 0]),
             "rgba.png": _png(np.dstack([rgb, rgb[..., :1]]), "RGBA")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        np.testing.assert_array_equal(api.decode_image(data, 1 << 25), load_rgb(tmp_path / name))
    assert api.decode_image(files["rot.jpg"], 1 << 25).shape == (50, 30, 3)
    with pytest.raises(BadRequestError, match="corrupt or truncated"):
        api.decode_image(files["rot.jpg"][:300], 1 << 25)


def test_error_body_is_one_line_json():
    body = api.error_body(400, "bad_request", "two\nlines  " + "x" * 400)
    assert body.endswith(b"\n") and body.count(b"\n") == 1
    error = json.loads(body)["error"]
    assert error["status"] == 400 and error["code"] == "bad_request" and len(error["message"]) <= 300
    status, body, headers = api.error_of(ServerBusyError("busy", headers={"Retry-After": "3"}))
    assert status == 503 and headers == {"Retry-After": "3"} and json.loads(body)["error"]["code"] == "unavailable"


def test_class_counts_and_settings():
    labels = np.array([[0, 1], [1, 255]], np.uint8)
    counts = api.class_counts(labels, ["bg", "cat", "dog"])
    assert [c["pixels"] for c in counts["classes"]] == [1, 2, 0] and counts["unlabelled_pixels"] == 1
    assert (counts["width"], counts["height"]) == (2, 2)
    assert ServeSettings().check().batch_size == 8
    for field, value in (("batch_size", 0), ("max_queued", -1), ("timeout_s", 0), ("port", 70000)):
        with pytest.raises(UsageError):
            ServeSettings(**{field: value}).check()


def test_segment_core_masks_equal_infer_without_ray(checkpoint_path, tmp_path):
    """A replica's work on a real (small-tile) runner, each tile its own engine batch, as infer
    --batch-size 1 cuts them: the same mask bytes; logits as predict_logits."""
    from fcn_deploy.infer import run_inference
    from fcn_deploy.runners.torch_runner import TorchRunner
    from fcn_deploy.serve.core import SegmentCore

    rng = np.random.default_rng(1)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (h, w) in enumerate([(40, 60), (120, 150)]):  # 1 and several tiles of 64x96
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(photos / f"p{i}.png")
    settings = ServeSettings(backend="torch", model=str(checkpoint_path), batch_size=1, overlap=32)
    core = SegmentCore(settings, runner=TorchRunner(checkpoint_path, tile_hw=(64, 96)))
    run_inference([photos], tmp_path / "out", runner=TorchRunner(checkpoint_path, tile_hw=(64, 96)), batch_size=1,
                  overlap=32, progress=False)

    async def submit(item):
        return (await asyncio.to_thread(core.run_batch, [item]))[0]

    try:
        for name in ("p0", "p1"):
            data = (photos / f"{name}.png").read_bytes()
            reply = asyncio.run(core.segment(data, "mask", submit))
            assert reply.body == (tmp_path / "out" / f"{name}.png").read_bytes()
            assert reply.media_type == "image/png" and reply.tiles >= 1
            logits = np.load(io.BytesIO(asyncio.run(core.segment(data, "logits", submit)).body))
            np.testing.assert_array_equal(logits, core.seg.predict_logits(api.decode_image(data, 1 << 20), np.float16))
        assert core.stats.snapshot()["batch_count"] >= 2 and core.stats.snapshot()["tiles_queued"] == 0
        assert core.info()["tile"] == {"height": 64, "width": 96}
    finally:
        core.close()


def test_metrics_exposition_names():
    pytest.importorskip("prometheus_client", reason="the 'serve' extra")
    from fcn_deploy.serve.metrics import ServeMetrics

    m = ServeMetrics()
    m.requests.labels("200", "mask").inc()
    m.latency.labels("mask").observe(0.2)
    m.replica_report("abc", {"batch_buckets": [1, 0, 2, 0, 0, 0, 0, 0], "batch_count": 3, "batch_tiles": 9,
                             "engine_seconds": 1.5, "tiles_queued": 2, "cancelled": 1})
    text = m.render()[0].decode()
    assert 'fcn_deploy_serve_requests_total{output="mask",status="200"} 1.0' in text
    assert 'fcn_deploy_serve_batch_tiles_bucket{le="4.0",replica="abc"} 3.0' in text
    assert 'fcn_deploy_serve_batch_tiles_count{replica="abc"} 3.0' in text
    assert 'fcn_deploy_serve_tiles_queued{replica="abc"} 2.0' in text
    assert 'fcn_deploy_serve_cancelled_total{replica="abc"} 1.0' in text
    assert "_created" not in text
