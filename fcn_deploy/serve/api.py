"""The HTTP API of ``fcn-deploy serve``, version 1, without Ray: settings and limits, request
validation (media type, encoding, query, sizes), image probing and decoding from bytes, the
answer's encodings and the one-line JSON error bodies. :mod:`fcn_deploy.serve.app` wires these
into Ray Serve; everything here is plain Python, testable without a server.

Routes (``docs/serving.md``)::

    POST /v1/segment[?output=mask|json|overlay|logits]   body: the image file
    GET  /v1/model    GET /healthz    GET /readyz    GET /metrics

A request never names a file on the server: the image is the body, the only query parameter is
``output``, and every other parameter is refused (400).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from fcn_deploy.errors import (
    BadRequestError,
    PayloadTooLargeError,
    RequestError,
    UnsupportedMediaTypeError,
    UsageError,
    shorten,
)

API_VERSION = "v1"
SEGMENT_ROUTE = f"/{API_VERSION}/segment"
MODEL_ROUTE = f"/{API_VERSION}/model"

#: ``?output=`` values and the media type of each answer. ``mask`` (the default) is the palette
#: PNG ``infer`` writes; ``json`` per-class pixel counts; ``overlay`` the photo blended with the
#: class colours (JPEG, as ``infer --overlay``); ``logits`` the averaged logits, float16
#: (C, H, W) ``.npy`` (as ``infer --save-logits``).
OUTPUTS: dict[str, str] = {
    "mask": "image/png",
    "json": "application/json",
    "overlay": "image/jpeg",
    "logits": "application/x-npy",
}
DEFAULT_OUTPUT = "mask"
QUERY_PARAMETERS = ("output",)

#: Image formats the server decodes (PIL format names). Narrower than what ``infer`` opens on
#: purpose: formats whose PIL plugins run external programs (EPS: Ghostscript) or rarely hold
#: photos are not offered to anyone who can reach the port.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")  # JPEG opens MPO (phones) too
#: Content-Type values taken (parameters such as ``; charset`` are ignored). A missing
#: Content-Type is taken too: the body's first bytes say what it is.
MEDIA_TYPES = (
    "image/jpeg", "image/pjpeg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp", "image/tiff",
    "image/gif", "image/x-portable-pixmap", "image/x-portable-anymap", "application/octet-stream",
)

#: Defaults of the limits (``fcn-deploy serve --help`` names the options).
DEFAULT_MAX_BODY_BYTES = 32 << 20
#: 2**25 = 33.5 megapixels (e.g. 8192x4096): a quarter of ``infer``'s default; an image of the
#: limit is ~500 tiles of 320x480 (overlap 128), ~50 s of engine time on the project's 2-core CPU.
DEFAULT_MAX_PIXELS = 1 << 25
#: The float16 logits answer: 21 classes of a 1.6-megapixel image.
DEFAULT_MAX_LOGITS_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRY_AFTER_S = 1


@dataclass
class ServeSettings:
    """Everything the server's processes need, in one picklable object (sent to every replica).

    Model: ``backend``, ``model`` (the artifact, resolved and checked fresh by the driver),
    ``device`` (``cpu`` or ``cuda:N``), ``precision``, ``runner_options`` (e.g. ``tile_hw``,
    ``threads``). Tiling as ``infer``: ``batch_size`` (tiles per engine batch, across requests),
    ``overlap``, ``window``. Batching (Ray Serve's ``@serve.batch``): ``batch_wait_s``, how long a
    batch that is not full waits for tiles of other requests. Replicas: ``replicas``,
    ``replica_cpus``, ``replica_gpus``, ``max_ongoing`` (requests one replica works on at once),
    ``max_queued`` (requests waiting for a replica beyond those; more: 503). Limits:
    ``max_body_bytes``, ``max_pixels`` (checked from the image header, before decoding),
    ``max_logits_bytes``, ``timeout_s`` (504 past it), ``retry_after_s`` (the 503's Retry-After).
    """

    backend: str = "ort"
    model: str | None = None
    device: str = "cpu"
    precision: str | None = None
    runner_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    overlap: int = 128
    window: str = "hann"
    batch_wait_s: float = 0.01
    replicas: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float | None = None
    max_ongoing: int = 16
    max_queued: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    retry_after_s: int = DEFAULT_RETRY_AFTER_S
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "fcn-deploy"

    def check(self) -> "ServeSettings":
        """Refuse (one line, naming the option) values that cannot work."""
        positive = {"--batch-size": self.batch_size, "--replicas": self.replicas, "--max-ongoing": self.max_ongoing,
                    "--max-body-bytes": self.max_body_bytes, "--max-pixels": self.max_pixels,
                    "--max-logits-bytes": self.max_logits_bytes}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name} must be a positive integer, not {value!r}")
        for name, value in {"--max-queued": self.max_queued, "--overlap": self.overlap,
                            "--retry-after": self.retry_after_s}.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"{name} must be an integer >= 0, not {value!r}")
        for name, value, low in (("--timeout", self.timeout_s, 0.0), ("--batch-wait", self.batch_wait_s, None),
                                 ("--replica-cpus", self.replica_cpus, None), ("--replica-gpus", self.replica_gpus, None)):
            if value is None and name == "--replica-gpus":
                continue  # resolved with the device
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0 or (low is not None and value <= low):
                raise UsageError(f"{name} must be a {'positive' if low is not None else 'non-negative'} number, "
                                 f"not {value!r}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in 0..65535, not {self.port}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- errors ---------------------------------------------------------------------------------
def error_body(status: int, code: str, message: str) -> bytes:
    """The one-line JSON error: ``{"error": {"status": 413, "code": "payload_too_large",
    "message": "..."}}`` (message on one line, at most 300 characters, never a traceback)."""
    line = " ".join(str(message).split())
    return json.dumps({"error": {"status": int(status), "code": code, "message": shorten(line, 300)}},
                      separators=(",", ":")).encode() + b"\n"


def error_of(exc: RequestError) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of a refused request."""
    return exc.status, error_body(exc.status, exc.code, str(exc)), dict(exc.headers)


# -- request checks (before the body is read) -------------------------------------------------
def media_type(content_type: str | None) -> str | None:
    """``image/JPEG; charset=x`` -> ``image/jpeg``; None or blank -> None."""
    if content_type is None:
        return None
    value = content_type.split(";", 1)[0].strip().lower()
    return value or None


def check_headers(content_type: str | None, content_encoding: str | None, content_length: str | None,
                  max_body_bytes: int) -> int | None:
    """Check a segment request's headers; returns the declared body length (None: not declared).

    Raises :class:`UnsupportedMediaTypeError` (415) for a Content-Type that is no image type the
    server decodes (:data:`MEDIA_TYPES`) or a Content-Encoding other than identity,
    :class:`PayloadTooLargeError` (413) for a Content-Length past ``max_body_bytes`` and
    :class:`BadRequestError` (400) for a Content-Length that is not a number.
    """
    kind = media_type(content_type)
    if kind is not None and kind not in MEDIA_TYPES:
        hint = " (curl: --data-binary @photo.jpg -H 'Content-Type: image/jpeg')" if kind.startswith(
            ("application/x-www-form-urlencoded", "multipart/")) else ""
        raise UnsupportedMediaTypeError(
            f"Content-Type {kind} is not an image type this server decodes; send the image file as the body "
            f"with Content-Type image/jpeg, image/png, image/webp, image/bmp, image/tiff, image/gif or "
            f"application/octet-stream{hint}")
    encoding = (content_encoding or "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaTypeError(f"Content-Encoding {encoding} is not supported; send the image file as is")
    if content_length is None or not content_length.strip():
        return None
    try:
        length = int(content_length.strip())
    except ValueError:
        raise BadRequestError(f"Content-Length {content_length!r} is not a number") from None
    if length < 0:
        raise BadRequestError(f"Content-Length {length} is negative")
    if length > max_body_bytes:
        raise PayloadTooLargeError(too_large_body(length, max_body_bytes))
    return length


def too_large_body(length: int | None, limit: int) -> str:
    size = f"{length} bytes" if length is not None else f"more than {limit} bytes"
    return f"request body too large: {size}, the limit is {limit} bytes (--max-body-bytes)"


def parse_query(items: Sequence[tuple[str, str]]) -> str:
    """The ``output`` of a segment request's query ``items`` (key, value pairs in order).

    Raises :class:`BadRequestError` for an unknown or repeated parameter or an unknown output:
    the API takes nothing else, in particular no path or URL of an image on the server.
    """
    seen: dict[str, str] = {}
    for key, value in items:
        if key not in QUERY_PARAMETERS:
            raise BadRequestError(f"unknown query parameter {shorten(key, 60)!r}; {SEGMENT_ROUTE} takes only "
                                  f"output={'|'.join(OUTPUTS)} and the image file as the request body")
        if key in seen:
            raise BadRequestError(f"query parameter {key!r} given twice")
        seen[key] = value
    output = seen.get("output", DEFAULT_OUTPUT).strip().lower() or DEFAULT_OUTPUT
    if output not in OUTPUTS:
        raise BadRequestError(f"output={shorten(seen['output'], 60)!r} is not one of {', '.join(OUTPUTS)}")
    return output


# -- images -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """What an image's header says, read without decoding its pixels."""

    width: int
    height: int
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open(data: bytes):
    from PIL import Image

    Image.init()  # every plugin registered: Image.open(formats=...) looks each one up by name
    return Image.open(io.BytesIO(data), formats=FORMATS)


def _image_error(exc: BaseException, max_pixels: int) -> RequestError:
    """What PIL raised while opening or decoding a body, as a 400 or 413."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, Image.DecompressionBombError):  # PIL's own check at open, beyond twice the limit
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else f"more than {2 * max_pixels} pixels"
        return PayloadTooLargeError(f"image too large: {size}, the limit is {max_pixels} pixels (--max-pixels)")
    if isinstance(exc, MemoryError):
        return PayloadTooLargeError("image too large to decode in the memory the server has")
    if isinstance(exc, UnidentifiedImageError):
        return BadRequestError(f"the request body is not an image this server decodes ({', '.join(FORMATS)})")
    return BadRequestError(f"corrupt or truncated image ({shorten(' '.join(str(exc).split()), 120) or type(exc).__name__})")


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """413 when ``width * height`` exceeds ``max_pixels`` (the rule of
    :func:`fcn_deploy.images.check_size`, worded for a client)."""
    if width * height > max_pixels:
        raise PayloadTooLargeError(f"image too large: {width}x{height} = {width * height} pixels, the limit is "
                                   f"{max_pixels} pixels (--max-pixels)")


def probe_image(data: bytes, max_pixels: int) -> Probe:
    """Width, height and format from the header of the image in ``data``, without decoding it.

    Raises :class:`BadRequestError` (400) for a body that is empty or no image of
    :data:`FORMATS`, :class:`PayloadTooLargeError` (413) for one of more than ``max_pixels``.
    """
    if not data:
        raise BadRequestError("the request body is empty; send the image file as the body")
    try:
        with _open(data) as img:
            probe = Probe(int(img.size[0]), int(img.size[1]), str(img.format))
    except RequestError:
        raise
    except Exception as exc:  # PIL raises many types for hostile headers
        raise _image_error(exc, max_pixels) from None
    if probe.pixels == 0:
        raise BadRequestError(f"the image is {probe.width}x{probe.height}: it has no pixels")
    check_pixels(probe.width, probe.height, max_pixels)
    return probe


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of the image in ``data``, as :func:`fcn_deploy.images.load_rgb`
    decodes a file (EXIF orientation applied, any mode converted the same way), so the server
    sees the pixels ``infer`` sees. The pixel limit is checked from the header first."""
    from PIL import ImageOps

    from fcn_deploy.images import to_rgb

    probe_image(data, max_pixels)
    try:
        with _open(data) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            return np.asarray(to_rgb(img), dtype=np.uint8).copy()
    except RequestError:
        raise
    except Exception as exc:
        raise _image_error(exc, max_pixels) from None


def check_tiles(width: int, height: int, tiles: int, tile_hw: tuple[int, int], max_pixels: int) -> None:
    """413 for an image that costs more tiles than ``infer``'s work limit at the server's pixel
    limit (:func:`fcn_deploy.infer.limits.default_max_tiles`): a 1 x 50,000,000 strip passes
    the pixel limit but costs tens of thousands of tiles."""
    from fcn_deploy.infer.limits import default_max_tiles

    limit = default_max_tiles(tile_hw, max_pixels)
    if tiles > limit:
        raise PayloadTooLargeError(f"too much work: a {width}x{height} image needs {tiles} tiles of "
                                   f"{tile_hw[0]}x{tile_hw[1]}, the limit is {limit} (16 x --max-pixels of tile area)")


def logits_bytes(num_classes: int, width: int, height: int) -> int:
    """Bytes of the float16 (C, H, W) ``.npy`` answer (its 128-byte header included)."""
    return 128 + 2 * num_classes * width * height


def check_logits(num_classes: int, width: int, height: int, limit: int) -> None:
    need = logits_bytes(num_classes, width, height)
    if need > limit:
        raise PayloadTooLargeError(f"output=logits of a {width}x{height} image is {need} bytes, the limit is {limit} "
                                   "bytes (--max-logits-bytes); ask for output=mask or send a smaller image")


# -- answers ------------------------------------------------------------------------------------
def class_counts(labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The ``output=json`` answer: per class its id, name and pixel count (every class of the
    model, zeros included), plus the pixels of no class (255: a NaN logit), in image order."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=256)
    h, w = labels.shape
    return {
        "width": int(w), "height": int(h),
        "classes": [{"id": i, "name": str(name), "pixels": int(counts[i])} for i, name in enumerate(classes)],
        "unlabelled_pixels": int(counts[len(classes):].sum()),
    }


def encode_png(labels: np.ndarray, pal: list[int]) -> bytes:
    """The palette PNG of ``labels``: the bytes ``infer`` writes (:func:`~fcn_deploy.infer.outputs.write_palette_png`)."""
    from fcn_deploy.infer.outputs import write_palette_png

    buf = io.BytesIO()
    write_palette_png(buf, labels, pal)
    return buf.getvalue()


def encode_overlay(rgb: np.ndarray, labels: np.ndarray, colormap) -> bytes:
    """The overlay JPEG (quality 90), as ``infer --overlay`` writes it."""
    from PIL import Image

    from fcn_deploy.infer.outputs import overlay_image

    buf = io.BytesIO()
    Image.fromarray(overlay_image(rgb, labels, colormap)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def encode_logits(logits: np.ndarray) -> bytes:
    """float16 (C, H, W) as ``.npy`` bytes."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(logits, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def server_timing(stages: Mapping[str, float]) -> str:
    """The W3C ``Server-Timing`` header of seconds per stage, e.g. ``decode;dur=3.1, engine;dur=96.0``
    (milliseconds, as the header wants)."""
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in stages.items())
