"""JPEG decoding straight onto the runner's device (``infer --decode gpu``): nvJPEG through
torchvision's batched ``decode_jpeg(list, device="cuda")``, with PIL (:func:`~fcn_deploy.images.load_rgb`)
as the fallback for everything else.

Why: on a GPU the ``infer`` pipeline is bound by the host, and decoding 12-megapixel JPEGs with
PIL is most of the host's work (about 0.1-0.8 s per photo, depending on how many decode at
once); nvJPEG decodes a batch of photos in one call and leaves them on the device, where the
tile assembler cuts them (no upload).

Two steps, so that file reading overlaps decoding:

* :func:`read_encoded` (a thread of the I/O pool): the checks of ``load_rgb`` (regular file,
  pixel limit before decoding, one-line errors naming the file), the header (format, mode, EXIF
  orientation) and, for a baseline/progressive JPEG in RGB (YCbCr) mode, its bytes;
* :func:`decode_batch` (:data:`DECODE_THREADS` decoder threads): one batched device decode of the JPEGs, the EXIF
  orientation applied on the device (as ``PIL.ImageOps.exif_transpose``); whatever the device
  decoder refuses (a corrupt file fails the whole batch: then each file alone), and every
  non-JPEG, grayscale or CMYK file, is decoded by PIL on the host.

On the CPU the same code runs torchvision's libjpeg-turbo decoder, whose pixels equal PIL's
(tests/test_devicedecode.py); nvJPEG's may differ by a grey level here and there, so masks can
differ from those of PIL-decoded photos at a few pixels (docs/architecture.md).

torchvision marks its image decoders deprecated in 0.29 in favour of TorchCodec; they still work,
and torchvision is already a dependency. The deprecation warning is silenced here.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from fcn_deploy.errors import FcnDeployError, UsageError
from fcn_deploy.images import check_regular_file, check_size, image_errors, load_rgb, naming_warnings

DECODE_KINDS: tuple[str, ...] = ("cpu", "gpu")
#: Images per batched device decode at most (a folder of small photos).
MAX_BATCH_IMAGES = 32
#: Declared pixels per batched device decode at most (one 12-megapixel photo already exceeds it:
#: large photos are decoded one by one, so the first tiles start after one decode, not 32).
MAX_BATCH_PIXELS = 8_000_000
#: Threads calling the device decoder (torchvision's CUDA decoder is thread-safe): while one
#: waits for its batch, the next batch's host-side work (Huffman decoding) goes on.
DECODE_THREADS = 2
_EXIF_ORIENTATION = 0x0112


@dataclass
class Encoded:
    """A file read by :func:`read_encoded`: ``data`` holds the JPEG's bytes when the device
    decoder may take it (None: PIL decodes it), ``orientation`` its EXIF orientation (1-8),
    ``pixels`` the pixel count its header declares."""

    path: Path
    data: bytes | None
    orientation: int
    pixels: int


def read_encoded(path: str | os.PathLike, limit: int | None = None) -> Encoded:
    """Check and read ``path`` for :func:`decode_batch` (raises
    :class:`~fcn_deploy.errors.ImageReadError` naming the file, as :func:`~fcn_deploy.images.load_rgb`)."""
    path = Path(path)
    with naming_warnings(path), image_errors(path, limit):
        check_regular_file(path)
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            check_size(path, width, height, limit)
            jpeg = img.format == "JPEG" and img.mode == "RGB"
            value = img.getexif().get(_EXIF_ORIENTATION, 1) if jpeg else 1
    orientation = int(value) if value in range(2, 9) else 1  # as exif_transpose: others are ignored
    return Encoded(path, data if jpeg else None, orientation, width * height)


def orient(image, orientation: int):
    """``image`` (H, W, 3) tensor in its displayed orientation: the flip or rotation of
    ``PIL.ImageOps.exif_transpose`` for EXIF ``orientation`` 1-8."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return image.flip(1)
    if orientation == 3:  # ROTATE_180
        return image.flip(0, 1)
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return image.flip(0)
    if orientation == 5:  # TRANSPOSE
        return image.transpose(0, 1)
    if orientation == 6:  # ROTATE_270 (clockwise quarter turn)
        return image.transpose(0, 1).flip(1)
    if orientation == 7:  # TRANSVERSE
        return image.transpose(0, 1).flip(0, 1)
    if orientation == 8:  # ROTATE_90 (counter-clockwise quarter turn)
        return image.transpose(0, 1).flip(0)
    return image


def decode_batch(encoded: Sequence[Encoded], device: str, limit: int | None = None) -> list[Any]:
    """Decode ``encoded`` files: for each, an (H, W, 3) uint8 tensor on ``device`` (a contiguous
    copy, in displayed orientation), or an (H, W, 3) uint8 numpy array (PIL's fallback), or the
    :class:`~fcn_deploy.errors.ImageReadError` naming the file. One batched device decode for
    all JPEGs; on CUDA it has finished when this returns (the caller's thread waits)."""
    import torch

    results: list[Any] = [None] * len(encoded)
    jpegs = [i for i, e in enumerate(encoded) if e.data is not None]
    decoded = _device_decode([encoded[i] for i in jpegs], device)
    if decoded is None and len(jpegs) > 1:  # the batch failed: find the files that fail alone
        decoded = [(_device_decode([encoded[i]], device) or [None])[0] for i in jpegs]
    for i, image in zip(jpegs, decoded or [None] * len(jpegs)):
        if image is not None:
            results[i] = orient(image.permute(1, 2, 0), encoded[i].orientation).contiguous()
    if torch.device(device).type == "cuda" and jpegs:
        torch.cuda.current_stream(device).synchronize()  # pragma: no mutate (CUDA only: the CPU decode is done)
    for i, e in enumerate(encoded):
        if results[i] is None:  # not a JPEG nvJPEG takes, or refused by it: PIL says what is wrong
            try:
                results[i] = load_rgb(e.path, limit)
            except FcnDeployError as exc:
                results[i] = exc
    return results


def _device_decode(encoded: Sequence[Encoded], device: str) -> list[Any] | None:
    """(3, H, W) uint8 tensors of ``encoded`` decoded in one call, or None if it raised."""
    if not encoded:
        return []
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(e.data), dtype=torch.uint8) for e in encoded]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29: "use TorchCodec"
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        return None


def check_decode(kind: str, assembler) -> None:
    """A one-line :class:`~fcn_deploy.errors.UsageError` unless ``--decode kind`` fits the
    segmenter's ``assembler``: ``gpu`` needs the torch assembler, which a CUDA runner gets (a
    torch assembler on the CPU, in tests, decodes with torchvision's CPU decoder)."""
    if kind not in DECODE_KINDS:
        raise UsageError(f"--decode must be one of {', '.join(DECODE_KINDS)}, not {kind!r}")
    if kind == "gpu" and getattr(assembler, "kind", None) != "torch":
        raise UsageError(f"--decode gpu needs a runner on a CUDA device, not {getattr(assembler, 'device', 'cpu')}; "
                         "use --decode cpu")


def batch_ends(encoded: Sequence[Encoded]) -> bool:
    """True when ``encoded`` fills one device decode (:data:`MAX_BATCH_IMAGES` images or
    :data:`MAX_BATCH_PIXELS` declared pixels)."""
    return len(encoded) >= MAX_BATCH_IMAGES or sum(e.pixels for e in encoded) >= MAX_BATCH_PIXELS


def as_host(rgb: Any) -> np.ndarray:
    """An (H, W, 3) uint8 image as numpy (a device tensor is copied to the host)."""
    if isinstance(rgb, np.ndarray):
        return rgb
    return rgb.cpu().numpy()
