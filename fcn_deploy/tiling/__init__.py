"""Tiled inference building blocks: the tile grid, tile extraction, windows and the numpy
stitcher (:mod:`fcn_deploy.tiling.grid`), and the one tile assembler that Segmenter, ``infer``
and ``evaluate`` use, on numpy or on torch tensors on the runner's device
(:mod:`fcn_deploy.tiling.assembler`)."""

from fcn_deploy.tiling.assembler import (
    ASSEMBLER_KINDS,
    Assembler,
    Batch,
    ImageJob,
    NumpyAssembler,
    StageClock,
    TorchAssembler,
    TorchStitcher,
    make_assembler,
)
from fcn_deploy.tiling.grid import (
    _CHUNK_ROWS,
    DEFAULT_ALIGN,
    DEFAULT_OVERLAP,
    DEFAULT_PAD_MODE,
    DEFAULT_WINDOW,
    HANN_FLOOR,
    PAD_MODES,
    WINDOWS,
    PadMode,
    Stitcher,
    TileBatch,
    TileBatcher,
    TileGrid,
    Window,
    _axis_window,
    argmax_classes,
    axis_origins,
    extract_tile,
    pad_tile,
    plan_tiles,
    tile_window,
)

__all__ = [
    "ASSEMBLER_KINDS", "Assembler", "Batch", "ImageJob", "NumpyAssembler", "StageClock", "TorchAssembler",
    "TorchStitcher", "make_assembler", "DEFAULT_ALIGN", "DEFAULT_OVERLAP", "DEFAULT_PAD_MODE",
    "DEFAULT_WINDOW", "HANN_FLOOR", "PAD_MODES", "WINDOWS", "PadMode", "Stitcher", "TileBatch",
    "TileBatcher", "TileGrid", "Window", "argmax_classes", "axis_origins", "extract_tile",
    "pad_tile", "plan_tiles", "tile_window", "_CHUNK_ROWS", "_axis_window",
]
