"""Resource limits checked before work starts: the host memory a batch of tiles needs, the work
one image may cost (its tiles), and the decoded pixels the pipeline holds ahead of the tiler.

The pixel limit of one image (``--max-pixels``) lives with image decoding, :mod:`fcn_deploy.images`.
Pixels alone do not bound the work: a 1 x 30,000,000 PNG (87 KB) passes the 134 MP pixel limit
but needs 85,227 tiles of 320x480, against 2,210 for a square 134 MP photo. The **work limit**
(``--max-tiles``) counts tiles, read from the header before decoding: by default as many tiles
as cover :data:`WORK_FACTOR` times the pixel limit (13,981 tiles of 320x480 at 2**27 pixels), so
it follows ``--max-pixels`` and the model's tile size.
"""

from __future__ import annotations

import os

from fcn_deploy.errors import ImageTooLargeError, UsageError

#: Upper bound of the host memory one batch's float32 tiles and float32 logits may take.
MAX_BATCH_BYTES = 16 << 30


def batch_memory_limit() -> int:
    """Bytes one batch may take: half the machine's RAM, at most :data:`MAX_BATCH_BYTES`."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: the fixed bound
        return MAX_BATCH_BYTES
    return min(MAX_BATCH_BYTES, ram // 2) if ram > 0 else MAX_BATCH_BYTES


def batch_bytes(batch: int, tile_hw: tuple[int, int], num_classes: int) -> int:
    """Host bytes of a batch: float32 (batch, 3, th, tw) tiles plus float32 (batch, C, th, tw) logits."""
    return batch * tile_hw[0] * tile_hw[1] * (3 + num_classes) * 4


def check_batch_size(batch: int, tile_hw: tuple[int, int], num_classes: int, limit: int | None = None,
                     option: str = "--batch-size") -> None:
    """Refuse (one line naming ``option``) a batch size whose tiles and logits exceed ``limit``
    bytes (default :func:`batch_memory_limit`), naming the largest batch that fits."""
    limit = batch_memory_limit() if limit is None else limit
    need = batch_bytes(batch, tile_hw, num_classes)
    if need > limit:
        fits = max(1, limit // batch_bytes(1, tile_hw, num_classes))
        raise UsageError(
            f"{option} {batch}: a batch of {tile_hw[0]}x{tile_hw[1]} tiles and their {num_classes}-class "
            f"logits needs {need / 2**30:.1f} GiB of memory, more than the {limit / 2**30:.1f} GiB allowed "
            f"(half the RAM, at most {MAX_BATCH_BYTES >> 30} GiB); use {option} {fits} or less"
        )


#: The default work limit is this many times the pixel limit, in padded tile area.
WORK_FACTOR = 16
#: Bytes of decoded pixels (height x width x 3 from the headers) the pipeline decodes ahead of
#: the tiler, at most; one image is always admitted, however large.
DECODE_AHEAD_BYTES = 256 << 20


def default_max_tiles(tile_hw: tuple[int, int], max_pixels: int | None = None) -> int:
    """The default ``--max-tiles``: tiles of ``tile_hw`` whose area is :data:`WORK_FACTOR` times
    ``max_pixels`` (default: the pixel limit in force, :func:`fcn_deploy.images.max_pixels`)."""
    if max_pixels is None:
        from fcn_deploy.images import max_pixels as current

        max_pixels = current()
    return max(1, WORK_FACTOR * max_pixels // (tile_hw[0] * tile_hw[1]))


def check_max_tiles(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise UsageError(f"--max-tiles must be at least 1, not {limit}")


def check_tiles(path, height: int, width: int, tiles: int, tile_hw: tuple[int, int], limit: int) -> None:
    """Refuse (:class:`~fcn_deploy.errors.ImageTooLargeError`, naming the file, its size, its
    tiles and the limit) an image of ``height`` x ``width`` that needs more than ``limit`` tiles."""
    if tiles > limit:
        raise ImageTooLargeError(
            f"{path}: too much work, {width}x{height} needs {tiles} tiles of {tile_hw[0]}x{tile_hw[1]}, more than "
            f"the limit of {limit}; raise it with --max-tiles {tiles}")
