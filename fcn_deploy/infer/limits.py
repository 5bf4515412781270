"""Resource limits checked before work starts: the host memory a batch of tiles needs.

(The pixel limit of one image lives with image decoding, :mod:`fcn_deploy.images`.)
"""

from __future__ import annotations

import os

from fcn_deploy.errors import UsageError

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


def check_batch_size(batch: int, tile_hw: tuple[int, int], num_classes: int, limit: int | None = None) -> None:
    """Refuse (one line) a ``--batch-size`` whose tiles and logits exceed ``limit`` bytes
    (default :func:`batch_memory_limit`), naming the largest batch that fits."""
    limit = batch_memory_limit() if limit is None else limit
    need = batch_bytes(batch, tile_hw, num_classes)
    if need > limit:
        fits = max(1, limit // batch_bytes(1, tile_hw, num_classes))
        raise UsageError(
            f"--batch-size {batch}: a batch of {tile_hw[0]}x{tile_hw[1]} tiles and their {num_classes}-class "
            f"logits needs {need / 2**30:.1f} GiB of memory, more than the {limit / 2**30:.1f} GiB allowed "
            f"(half the RAM, at most {MAX_BATCH_BYTES >> 30} GiB); use --batch-size {fits} or less"
        )
