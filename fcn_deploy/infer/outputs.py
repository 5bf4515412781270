"""What ``infer`` writes per image, each file atomically.

* ``<name>.png``: palette PNG (PIL mode "P") whose pixel values are class ids, with the class
  colours attached as its palette (the VOC palette for VOC models);
* ``<name>.overlay.jpg``: the photo with each non-background pixel's class colour laid over it
  at :data:`OVERLAY_ALPHA` (background, class 0, left as the photo: its brightness is kept);
* ``<name>.logits.npy``: averaged logits, float16 (C, H, W), streamed into a memory map.

Every file goes through :mod:`fcn_deploy.fileio`: a locked temporary, every byte written checked,
the size on disk verified before the rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np
from PIL import Image

from fcn_deploy.fileio import atomic_file, atomic_path, save_image
from fcn_deploy.voc import colormap_array, voc_palette

MASK_SUFFIX = ".png"
OVERLAY_SUFFIX = ".overlay.jpg"
LOGITS_SUFFIX = ".logits.npy"
#: Opacity of the class colours over the photo in an overlay.
OVERLAY_ALPHA = 0.5
#: JPEG quality of the overlays.
OVERLAY_QUALITY = 90


def output_path(output_dir: str | os.PathLike, rel_stem: str | os.PathLike, suffix: str) -> Path:
    """``output_dir / rel_stem`` with ``suffix`` appended (``rel_stem`` may contain dots)."""
    return Path(os.path.join(output_dir, os.fspath(rel_stem) + suffix))  # one Path made: called per image


def palette(colormap: Sequence[Sequence[int]] | None = None) -> list[int]:
    """768-entry PIL palette: the VOC palette with entries 0..K-1 replaced by ``colormap``."""
    pal = voc_palette()
    for i, rgb in enumerate(colormap or ()):
        pal[3 * i: 3 * i + 3] = [int(v) for v in rgb]
    return pal


def write_mask(path: str | os.PathLike, labels: np.ndarray, pal: list[int]) -> None:
    """Write (H, W) uint8 class ids as a palette PNG (see :func:`write_palette_png`)."""
    with atomic_file(path) as file:
        write_palette_png(file, labels, pal)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Bytes of filtered rows handed to zlib at a time: bounds the encoder's copy of the mask.
PNG_BLOCK_BYTES = 1 << 22


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def write_palette_png(file: BinaryIO, labels: np.ndarray, pal: Sequence[int], level: int = 1) -> None:
    """Write (H, W) uint8 ``labels`` to ``file`` as an 8-bit palette PNG (PIL reads it as mode
    "P" with the same values and ``pal``, 3 * K <= 768 RGB bytes, as its palette).

    Written here rather than by PIL because PIL's encoder holds the GIL for much of a small mask
    (0.33 ms of ~0.7 ms per 500x375 mask against 0.07 ms here, measured with py-spy): in ``infer``
    the masks are encoded by threads beside the ones feeding the GPU. Scanlines get filter type
    0 (none; class maps compress well without), are deflated at ``level`` (1: fast) by stdlib
    :mod:`zlib`, which releases the GIL, in blocks of :data:`PNG_BLOCK_BYTES` (one IDAT chunk
    per non-empty output), so memory stays bounded for any image size.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8 or 0 in labels.shape:
        raise ValueError(f"a mask must be a non-empty (H, W) uint8 array, got {labels.dtype} {labels.shape}")
    colours = bytes(pal)
    if not 0 < len(colours) <= 768 or len(colours) % 3:
        raise ValueError(f"a palette holds 1 to 256 RGB triples, got {len(colours)} values")
    h, w = labels.shape
    file.write(_PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
               + _png_chunk(b"PLTE", colours))
    deflate = zlib.compressobj(level)
    rows = max(1, PNG_BLOCK_BYTES // (w + 1))
    block = np.zeros((min(rows, h), w + 1), np.uint8)  # column 0: each row's filter type, 0
    for y in range(0, h, rows):
        n = min(rows, h - y)
        block[:n, 1:] = labels[y: y + n]
        data = deflate.compress(block[:n])
        if data:
            file.write(_png_chunk(b"IDAT", data))
    file.write(_png_chunk(b"IDAT", deflate.flush()) + _png_chunk(b"IEND", b""))


def overlay_image(rgb: np.ndarray, labels: np.ndarray, colormap: Sequence[Sequence[int]],
                  alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """(H, W, 3) uint8: the photo ``rgb`` with each pixel's class colour laid over it at opacity
    ``alpha``, except background (class 0), which stays the photo's own pixels."""
    colours = colormap_array(colormap)
    lut = np.zeros((256, 3), dtype=np.float32)
    lut[: len(colours)] = colours
    painted = labels != 0
    out = rgb.copy()
    if painted.any():
        under = rgb[painted].astype(np.float32)
        out[painted] = np.rint(under + alpha * (lut[labels[painted]] - under)).astype(np.uint8)
    return out


def write_overlay(path: str | os.PathLike, rgb: np.ndarray, labels: np.ndarray, colormap) -> None:
    """Write :func:`overlay_image` as a JPEG, atomically and verified (:func:`~fcn_deploy.fileio.save_image`)."""
    save_image(path, Image.fromarray(overlay_image(rgb, labels, colormap)), "JPEG", quality=OVERLAY_QUALITY)


def allocate(path: str | os.PathLike, size: int) -> None:
    """Reserve ``size`` bytes of disk for the file ``path`` for real (not a sparse file), so a full
    disk or a file-size limit raises OSError (ENOSPC, EFBIG) now, not SIGBUS later when a memory
    map's page is written. ``os.posix_fallocate`` where available (glibc emulates it by writing
    on file systems without fallocate), else zeros written in chunks."""
    fd = os.open(path, os.O_RDWR)
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        chunk = bytes(1 << 20)
        done = os.fstat(fd).st_size
        os.lseek(fd, done, os.SEEK_SET)
        while done < size:
            done += os.write(fd, chunk[: min(len(chunk), size - done)])
    finally:
        os.close(fd)


@contextlib.contextmanager
def logits_memmap(path: str | os.PathLike, shape: tuple[int, int, int]) -> Iterator[np.memmap]:
    """A writable float16 ``.npy`` memory map of ``shape`` (C, H, W), renamed to ``path`` on
    success; the disk, not RAM, holds the logits of a huge image.

    The file's blocks are allocated before the map is made (:func:`allocate`): a disk too full
    for it raises :class:`~fcn_deploy.errors.OutputWriteError` here and leaves no temporary file.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                    "shape": tuple(shape)})
            offset = f.tell()
        allocate(tmp, offset + int(np.prod(shape)) * 2)
        size = offset + int(np.prod(shape)) * 2
        arr = np.memmap(tmp, dtype=np.float16, mode="r+", offset=offset, shape=tuple(shape))
        try:
            yield arr
            arr.flush()
        finally:
            del arr
        if os.stat(tmp).st_size != size:  # the blocks were reserved: this guards the bookkeeping
            raise OSError(errno.EIO, f"{os.stat(tmp).st_size} bytes on disk, {size} expected (a short write)")
