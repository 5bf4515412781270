"""Tiled inference building blocks, backend-free (no runner, no file I/O):

* :mod:`~fcn_deploy.tiling.grid`: where the tiles of an image go, padding, windows, argmax;
* :mod:`~fcn_deploy.tiling.assembler`: the :class:`Assembler` interface (cut images into
  normalised tile batches, stitch the results back) and its numpy implementation, with the
  memory-bounded numpy :class:`Stitcher`;
* :mod:`~fcn_deploy.tiling.torch_assembler`: the same on torch tensors on the runner's device;
* :mod:`~fcn_deploy.tiling.arena`: the torch assembler's small-image arena;
* :mod:`~fcn_deploy.tiling.clock`: :class:`StageClock`, seconds per pipeline stage.

:func:`make_assembler` picks the assembler for a runner's device; Segmenter, ``infer`` and
``evaluate`` all go through it.
"""

from __future__ import annotations

from typing import Literal

from fcn_deploy.tiling.assembler import Assembler, Batch, ImageJob, NumpyAssembler, Stitcher, TileBatch, TileBatcher
from fcn_deploy.tiling.clock import StageClock
from fcn_deploy.tiling.grid import (
    DEFAULT_ALIGN,
    DEFAULT_OVERLAP,
    DEFAULT_PAD_MODE,
    DEFAULT_WINDOW,
    HANN_FLOOR,
    PAD_MODES,
    WINDOWS,
    PadMode,
    TileGrid,
    Window,
    argmax_classes,
    axis_origins,
    extract_tile,
    pad_tile,
    plan_tiles,
    tile_window,
)
from fcn_deploy.tiling.torch_assembler import TorchAssembler, TorchStitcher

AssemblerKind = Literal["auto", "numpy", "torch"]
ASSEMBLER_KINDS: tuple[str, ...] = ("auto", "numpy", "torch")

__all__ = [
    "ASSEMBLER_KINDS", "Assembler", "Batch", "ImageJob", "NumpyAssembler", "StageClock", "TorchAssembler",
    "TorchStitcher", "make_assembler", "DEFAULT_ALIGN", "DEFAULT_OVERLAP", "DEFAULT_PAD_MODE",
    "DEFAULT_WINDOW", "HANN_FLOOR", "PAD_MODES", "WINDOWS", "PadMode", "Stitcher", "TileBatch",
    "TileBatcher", "TileGrid", "Window", "argmax_classes", "axis_origins", "extract_tile",
    "pad_tile", "plan_tiles", "tile_window",
]


def make_assembler(
    kind: AssemblerKind = "auto",
    *,
    device: str = "cpu",
    tile_hw: tuple[int, int],
    batch_size: int,
    mean,
    std,
    window: str = DEFAULT_WINDOW,
    pad_mode: str = DEFAULT_PAD_MODE,
    floor: float = HANN_FLOOR,
) -> Assembler:
    """The assembler for a runner on ``device``: ``"auto"`` picks numpy on the CPU (faster
    there, ``benchmarks/assembler_cpu.py``) and torch on CUDA; ``"torch"`` / ``"numpy"`` force
    one (``"numpy"`` only for a CPU runner)."""
    if kind not in ASSEMBLER_KINDS:
        raise ValueError(f"assembler must be one of {ASSEMBLER_KINDS}, not {kind!r}")
    on_cpu = str(device).split(":")[0] == "cpu"
    if kind == "numpy" and not on_cpu:
        raise ValueError(f"the numpy assembler needs a CPU runner, not one on {device}")
    args = (tile_hw, batch_size, mean, std)
    kwargs = dict(window=window, pad_mode=pad_mode, floor=floor)
    if kind == "numpy" or (kind == "auto" and on_cpu):
        return NumpyAssembler(*args, **kwargs)
    return TorchAssembler(*args, device=device, **kwargs)
