"""Tile grid, padding, windows, batching and the memory-bounded stitcher (pure numpy)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcn_deploy.tiling import (
    DEFAULT_OVERLAP,
    Stitcher,
    TileBatcher,
    argmax_classes,
    axis_origins,
    extract_tile,
    pad_tile,
    plan_tiles,
    tile_window,
)
from fcn_deploy.defaults import TILE_HW


def _coverage(grid) -> np.ndarray:
    count = np.zeros((grid.height, grid.width), dtype=np.int32)
    for i in range(grid.count):
        y0, y1, x0, x1 = grid.box(i)
        count[y0:y1, x0:x1] += 1
    return count


@settings(deadline=None)  # 200 examples in CI, 25 in mutation runs: the profiles of conftest.py
@given(
    height=st.integers(1, 1500),
    width=st.integers(1, 1500),
    th=st.sampled_from([32, 64, 96, 320]),
    tw=st.sampled_from([32, 96, 128, 480]),
    overlap_frac=st.floats(0, 0.95),
)
def test_tiles_cover_every_pixel_with_min_overlap(height, width, th, tw, overlap_frac):
    overlap = int(overlap_frac * (min(th, tw) - 1))
    grid = plan_tiles(height, width, (th, tw), overlap)
    assert _coverage(grid).min() >= 1
    for length, tile, origins in ((height, th, grid.ys), (width, tw, grid.xs)):
        assert origins[0] == 0
        assert list(origins) == sorted(set(origins))
        assert origins[-1] == max(0, length - tile)  # the last tile ends at the border
        steps = np.diff(origins)
        assert (steps <= tile - overlap).all()  # neighbours overlap by at least `overlap`
        if tile - overlap >= 32:
            assert all(o % 32 == 0 for o in origins[:-1])  # aligned with the stride-32 features
    assert grid.padded_hw == (max(height, th), max(width, tw))


def test_grid_examples():
    grid = plan_tiles(1, 1)
    assert (grid.count, grid.box(0), grid.padded_hw) == (1, (0, 1, 0, 1), TILE_HW)
    grid = plan_tiles(640, 960, TILE_HW, 128)
    assert grid.ys == (0, 160, 320) and grid.xs == (0, 256, 480)
    assert plan_tiles(320, 480).count == 1
    assert axis_origins(1000, 320, 0) == (0, 224, 448, 680)  # evenly spread, snapped to 32


@pytest.mark.parametrize("overlap", [-1, 320])
def test_bad_overlap(overlap):
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles(1000, 1000, TILE_HW, overlap)


def test_pad_tile_modes_and_extract():
    crop = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    const = pad_tile(crop, (5, 6), "constant")
    assert const.shape == (2, 5, 6)
    np.testing.assert_array_equal(const[:, :3, :4], crop)
    assert not const[:, 3:].any() and not const[:, :, 4:].any()
    refl = pad_tile(crop, (5, 6), "reflect")
    np.testing.assert_array_equal(refl[:, 3, :4], crop[:, 1])  # mirrored about the last row
    one = pad_tile(np.full((3, 1, 1), 7, np.float32), (4, 4), "reflect")
    assert (one == 7).all()
    image = np.random.default_rng(0).random((3, 50, 70)).astype(np.float32)
    grid = plan_tiles(50, 70, (32, 64), 16)
    for i in range(grid.count):
        y0, y1, x0, x1 = grid.box(i)
        tile = extract_tile(image, grid, i)
        assert tile.shape == (3, 32, 64) and tile.dtype == np.float32
        np.testing.assert_array_equal(tile[:, : y1 - y0, : x1 - x0], image[:, y0:y1, x0:x1])


def test_windows():
    np.testing.assert_array_equal(tile_window((4, 6), "uniform"), np.ones((4, 6), np.float32))
    w = tile_window((32, 48), "hann", floor=0.01)
    assert w.dtype == np.float32 and w.min() > 0 and w.max() <= 1
    assert w[16, 24] > 0.99 and w[0, 0] < 0.02  # weight falls toward the tile edges
    flat = tile_window((32, 48), "hann", floor=0.01, borders=(True, False, False, False))
    assert (flat[:16, 24] == flat[0, 24]).all() and flat[0, 24] > 0.99  # no taper at an image border
    assert flat[-1, 24] < 0.02
    with pytest.raises(ValueError, match="window"):
        tile_window((4, 4), "gauss")


def test_argmax_classes_matches_numpy_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (21, 30, 40)).astype(np.float32)  # many ties
    labels = argmax_classes(scores)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.argmax(scores, axis=0))
    scores[3, 0, 0] = np.nan
    assert argmax_classes(scores)[0, 0] == 255  # NaN logits: void, not a class


@pytest.mark.parametrize("window", ["uniform", "hann"])
@pytest.mark.parametrize("hw", [(1, 1), (20, 30), (64, 96), (150, 97), (257, 333)])
def test_identical_overlaps_average_to_the_input(window, hw):
    """Tiles cut from one logit map F stitch back to exactly F, padding never leaking in."""
    h, w = hw
    rng = np.random.default_rng(h * w)
    full = rng.standard_normal((5, h, w)).astype(np.float32)
    grid = plan_tiles(h, w, (64, 96), 32)
    out = np.zeros((5, h, w), np.float32)
    stitcher = Stitcher(grid, 5, window, logits_out=out)
    for i in range(grid.count):
        y0, y1, x0, x1 = grid.box(i)
        tile = np.full((5, 64, 96), 1e6, np.float32)  # padding: would win every argmax
        tile[:, : y1 - y0, : x1 - x0] = full[:, y0:y1, x0:x1]
        stitcher.add(i, tile.astype(np.float16) if i % 2 else tile)
    labels = stitcher.labels()
    assert labels.shape == (h, w) and labels.dtype == np.uint8
    np.testing.assert_allclose(out, full, rtol=0, atol=5e-3)  # odd tiles went as float16
    assert (labels == full.argmax(0)).mean() > 0.999


def test_uniform_average_is_exact_for_float32():
    rng = np.random.default_rng(1)
    full = rng.standard_normal((3, 100, 150)).astype(np.float32)
    grid = plan_tiles(100, 150, (64, 96), 48)
    out = np.zeros_like(full)
    stitcher = Stitcher(grid, 3, "uniform", logits_out=out)
    for i in range(grid.count):
        y0, y1, x0, x1 = grid.box(i)
        stitcher.add(i, extract_tile(full, grid, i))
    np.testing.assert_allclose(out, full, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(stitcher.labels(), full.argmax(0))


def test_overlaps_are_averaged():
    """Two tiles disagreeing on the overlap: uniform gives the mean there."""
    grid = plan_tiles(64, 96, (64, 64), 32)
    assert grid.xs == (0, 32)
    out = np.zeros((2, 64, 96), np.float32)
    stitcher = Stitcher(grid, 2, "uniform", logits_out=out)
    stitcher.add(0, np.full((2, 64, 64), 1.0, np.float32))
    stitcher.add(1, np.full((2, 64, 64), 3.0, np.float32))
    np.testing.assert_allclose(out[:, :, :32], 1.0)
    np.testing.assert_allclose(out[:, :, 32:64], 2.0)
    np.testing.assert_allclose(out[:, :, 64:], 3.0)


def test_stitcher_rejects_misuse():
    grid = plan_tiles(200, 100, (64, 96), 32)
    stitcher = Stitcher(grid, 3)
    tile = np.zeros((3, 64, 96), np.float32)
    with pytest.raises(ValueError, match="shape"):
        stitcher.add(0, np.zeros((3, 64, 95), np.float32))
    with pytest.raises(ValueError, match=f"^{grid.count} of {grid.count} tiles not added yet"):
        stitcher.labels()
    with pytest.raises(ValueError, match=f"tile {grid.cols * 2} of row 2 arrived before tile 0$"):
        stitcher.add(grid.cols * 2, tile)
    for i in range(grid.cols * 2):
        stitcher.add(i, tile)
    with pytest.raises(ValueError, match="twice|finalised"):
        stitcher.add(0, tile)
    with pytest.raises(ValueError, match="num_classes"):
        Stitcher(grid, 300)


def test_stitcher_memory_is_bounded_on_8000x8000():
    """8000x8000, 21 classes: a full float32 logit buffer would be 5.4 GB; the stitcher holds
    one 320-row band (215 MB) plus the uint8 labels (64 MB), and finalises rows as it goes."""
    h = w = 8000
    grid = plan_tiles(h, w, TILE_HW, DEFAULT_OVERLAP)
    tile = np.zeros((21, *TILE_HW), np.float16)
    tile[7] = 1.0  # constant logits: class 7 everywhere
    full_bytes = 21 * h * w * 4
    tracemalloc.start()
    try:
        stitcher = Stitcher(grid, 21, "hann")
        for i in range(3 * grid.cols + 1):  # three tile rows and the first tile of the fourth
            stitcher.add(i, tile)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stitcher.band.shape == (21, TILE_HW[0], w) and stitcher.weight.shape == (TILE_HW[0], w)
    assert stitcher.buffer_bytes < full_bytes / 15
    assert peak < full_bytes / 12, f"peak {peak / 1e6:.0f} MB"
    assert stitcher.rows_done == grid.ys[3]  # rows above the fourth tile row are final
    assert (stitcher._labels[: grid.ys[3]] == 7).all()


def test_stitcher_streams_rows_of_a_tall_image(tmp_path):
    h, w = 5000, 300
    grid = plan_tiles(h, w, (64, 96), 32)
    out = np.lib.format.open_memmap(  # streamed logits need no RAM buffer either
        str(tmp_path / "logits.npy"), mode="w+", dtype=np.float16, shape=(3, h, w)
    )
    stitcher = Stitcher(grid, 3, "hann", logits_out=out)
    rows_seen = []
    for i in range(grid.count):
        x = np.zeros((3, 64, 96), np.float32)
        x[(grid.origin(i)[0] // 64) % 3] = 1.0  # the class depends on the tile row
        stitcher.add(i, x)
        rows_seen.append(stitcher.rows_done)
    assert rows_seen == sorted(rows_seen) and rows_seen[grid.cols] > 0
    labels = stitcher.labels()
    assert labels.shape == (h, w)
    assert (np.asarray(out).argmax(0) == labels).mean() > 0.999  # float16 may round near-ties
    assert set(np.unique(labels)) == {0, 1, 2}


def test_batcher_packs_tiles_of_several_images():
    batcher = TileBatcher(3, (1, 2, 2))
    batches = []
    for image, n in (("a", 2), ("b", 5)):
        for i in range(n):
            batcher.slot()[...] = i
            batch = batcher.commit((image, i))
            if batch is not None:
                batches.append(batch)
    last = batcher.flush()
    assert last is not None and batcher.flush() is None
    batches.append(last)
    assert [b.keys for b in batches] == [
        [("a", 0), ("a", 1), ("b", 0)], [("b", 1), ("b", 2), ("b", 3)], [("b", 4)]
    ]
    assert batches[2].tiles.shape == (1, 1, 2, 2)
    assert batches[0].tiles.shape == (3, 1, 2, 2)
    assert [float(t[0, 0, 0]) for t in batches[1].tiles] == [1, 2, 3]
    assert batches[0].tiles is not batches[1].tiles  # fresh buffer per batch


# --- windows, image borders and boundaries (found by mutation testing, docs/testing.md) ---------

def _hann(n: int, floor: float, flat_start: bool, flat_end: bool) -> np.ndarray:
    """The documented per-axis window, written out: floor + (1 - floor) sin^2(pi (i + 0.5) / n),
    held at 1 from the centre to a side lying on the image border."""
    w = np.array([floor + (1 - floor) * np.sin(np.pi * (i + 0.5) / n) ** 2 for i in range(n)])
    if flat_start:
        w[: n // 2] = 1
    if flat_end:
        w[n // 2:] = 1
    return w


def _reference_stitch(grid, tiles, window: str, floor: float = 0.01) -> np.ndarray:
    """(C, H, W) weighted average of the tiles in a full-size buffer: the oracle for Stitcher."""
    c = tiles[0].shape[0]
    acc = np.zeros((c, grid.height, grid.width))
    wsum = np.zeros((grid.height, grid.width))
    for i, tile in enumerate(tiles):
        row, col = divmod(i, grid.cols)
        y0, y1, x0, x1 = grid.box(i)
        if window == "uniform":
            win = np.ones(grid.tile_hw)
        else:
            wy = _hann(grid.tile_hw[0], floor, row == 0, row == grid.rows - 1)
            wx = _hann(grid.tile_hw[1], floor, col == 0, col == grid.cols - 1)
            win = np.outer(wy, wx)
        h, w = y1 - y0, x1 - x0
        acc[:, y0:y1, x0:x1] += tile[:, :h, :w] * win[:h, :w]
        wsum[y0:y1, x0:x1] += win[:h, :w]
    return acc / wsum


def test_hann_window_values_and_each_border_side():
    floor = 0.05
    th, tw = 10, 7  # odd width: the centre column is not a tile edge
    w = tile_window((th, tw), "hann", floor)
    np.testing.assert_allclose(w, np.outer(_hann(th, floor, False, False), _hann(tw, floor, False, False)),
                               rtol=1e-6)
    np.testing.assert_allclose(w, w[::-1, ::-1], rtol=1e-6)  # symmetric without borders
    assert w.min() == pytest.approx(_hann(th, floor, 0, 0)[0] * _hann(tw, floor, 0, 0)[0], rel=1e-6)
    for side in range(4):  # (top, bottom, left, right): each flag flattens its own side only
        borders = tuple(i == side for i in range(4))
        expected = np.outer(_hann(th, floor, *borders[:2]), _hann(tw, floor, *borders[2:]))
        np.testing.assert_allclose(tile_window((th, tw), "hann", floor, borders), expected, rtol=1e-6)
    everywhere = tile_window((th, tw), "hann", floor, (True, True, True, True))
    assert (everywhere == 1).all() and everywhere.dtype == np.float32  # a lone tile: plain average
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="floor"):
            tile_window((4, 4), "hann", bad)
    assert (tile_window((3, 3), "hann", 1.0) == 1).all()  # floor 1 is allowed: uniform weights


@pytest.mark.parametrize("window", ["uniform", "hann"])
@pytest.mark.parametrize("hw", [(40, 50), (64, 96), (100, 64), (150, 97), (161, 230)])
def test_disagreeing_tiles_stitch_to_the_weighted_average(window, hw):
    """Tiles with different logits on their overlaps (as real tiles have): the stitched logits
    are the window-weighted average, with windows flat toward the image borders, and the labels
    are its argmax. Catches window, border-flag, ring-buffer and padding errors."""
    h, w = hw
    grid = plan_tiles(h, w, (64, 64), 32)
    rng = np.random.default_rng(h + w)
    tiles = [rng.standard_normal((3, 64, 64)).astype(np.float32) for _ in range(grid.count)]
    out = np.zeros((3, h, w), np.float32)
    stitcher = Stitcher(grid, 3, window, logits_out=out)
    for i, tile in enumerate(tiles):
        stitcher.add(i, tile)
    expected = _reference_stitch(grid, tiles, window)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    labels = stitcher.labels()
    assert (labels == expected.argmax(0)).mean() > 0.999  # float32 rounding may flip near-ties


def test_tile_rows_finalise_exactly_the_rows_above_the_next_row():
    grid = plan_tiles(160, 64, (64, 64), 16)
    assert grid.rows > 2 and grid.cols == 1
    stitcher = Stitcher(grid, 2, "uniform")
    tile = np.zeros((2, 64, 64), np.float32)
    for i in range(grid.count):
        stitcher.add(i, tile)
        # a new tile row starting at y makes the rows above y final; the last tile, all rows
        assert stitcher.rows_done == (grid.ys[i] if i + 1 < grid.count else 160)
        assert stitcher.done == (i + 1 == grid.count)


def test_extract_tile_at_the_image_borders():
    """Edge tiles hold the image up to its last row/column and padding after it."""
    image = np.arange(1, 1 + 2 * 70 * 100, dtype=np.float32).reshape(2, 70, 100)
    grid = plan_tiles(70, 100, (64, 64), 16)
    last = grid.count - 1
    assert grid.box(last) == (6, 70, 36, 100)  # the last tile ends exactly at the border
    np.testing.assert_array_equal(extract_tile(image, grid, last), image[:, 6:70, 36:100])
    small = plan_tiles(20, 30, (32, 48), 0)
    tile = extract_tile(image[:, :20, :30], small, 0, "constant")
    np.testing.assert_array_equal(tile[:, :20, :30], image[:, :20, :30])
    assert not tile[:, 20:].any() and not tile[:, :, 30:].any()
    refl = extract_tile(image[:, :20, :30], small, 0, "reflect")
    np.testing.assert_array_equal(refl[:, 20, :30], image[:, 18, :30])  # mirrored at row 19
    np.testing.assert_array_equal(refl[:, :20, 30], image[:, :20, 28])
    with pytest.raises(ValueError, match="does not match"):
        extract_tile(image, small, 0)
    with pytest.raises(ValueError, match="does not match"):
        extract_tile(image[0], grid, 0)


def test_axis_origins_boundaries():
    assert axis_origins(64, 64, 0) == (0,)  # exactly one tile long
    assert axis_origins(65, 64, 0) == (0, 1)  # one pixel longer: a second tile at the border
    assert axis_origins(65, 64, 63) == (0, 1)  # the largest overlap (tile - 1) is allowed
    assert axis_origins(1, 64, 0) == (0,)
    assert axis_origins(224, 64, 32) == (0, 32, 64, 96, 128, 160)  # step == tile - overlap == align
    assert axis_origins(128, 64, 0) == (0, 64)  # neighbours may touch without overlap
    # rounding to 32 breaks the even spread of 4 tiles (a step > 128): 5 tiles, not 6
    assert axis_origins(673, 320, 192) == (0, 96, 192, 256, 353)
    assert axis_origins(100, 64, 40) == (0, 18, 36)  # step 24 < align 32: spread to the pixel
    assert axis_origins(100, 64, 40, align=0) == (0, 18, 36)
    assert axis_origins(102, 64, 40, align=1) == axis_origins(102, 64, 40, align=0) == (0, 19, 38)
    for args in ((0, 64, 0), (10, 0, 0)):
        with pytest.raises(ValueError, match=f"length and tile must be positive, got {args[0]} and {args[1]}"):
            axis_origins(*args)
    for overlap in (64, -1):
        with pytest.raises(ValueError, match=rf"overlap must be in \[0, 64\), got {overlap}"):
            axis_origins(100, 64, overlap)


def test_plan_tiles_overlap_limits_use_the_shorter_side():
    assert plan_tiles(200, 200, (64, 96), 63).ys[1] == 1  # overlap up to the shorter side - 1
    assert plan_tiles(200, 200, (64, 96), 0).count == 4 * 3
    with pytest.raises(ValueError, match=r"overlap 64 must be in \[0, 64\) for tiles 64x96"):
        plan_tiles(200, 200, (64, 96), 64)


def test_plan_tiles_passes_align_to_both_axes():
    grid = plan_tiles(200, 150, (64, 64), 0, align=16)
    assert grid.ys == (0, 48, 96, 136) and grid.xs == (0, 48, 86)  # multiples of 16, last at the border
    assert plan_tiles(200, 150, (64, 64), 0).ys == (0, 32, 96, 136)  # the default: 32


def test_grid_index_limits():
    grid = plan_tiles(100, 100, (64, 64), 0)
    assert grid.count == 4 and grid.origin(3) == (36, 36) and grid.origin(1) == (0, 36)
    for bad in (-1, 4):
        with pytest.raises(IndexError, match=r"out of range \[0, 4\)"):
            grid.origin(bad)
        with pytest.raises(IndexError, match=r"out of range \[0, 4\)"):
            Stitcher(grid, 2).add(bad, np.zeros((2, 64, 64), np.float32))


def test_stitcher_argument_limits(tmp_path):
    grid = plan_tiles(10, 10, (8, 8), 0)
    for n in (1, 255):
        Stitcher(grid, n)
    for n in (0, 256):
        with pytest.raises(ValueError, match=r"num_classes must be in \[1, 255\]"):
            Stitcher(grid, n)
    with pytest.raises(ValueError, match=r"logits_out has shape \(2, 10, 9\), expected \(2, 10, 10\)"):
        Stitcher(grid, 2, logits_out=np.zeros((2, 10, 9), np.float32))
    with pytest.raises(ValueError, match="window must be one of"):
        Stitcher(grid, 2, "gauss")


def test_one_class_and_a_lone_tile():
    grid = plan_tiles(5, 7, (8, 8), 0)
    out = np.zeros((1, 5, 7), np.float32)
    stitcher = Stitcher(grid, 1, "hann", logits_out=out)
    tile = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    stitcher.add(0, tile)
    assert stitcher.done and (stitcher.labels() == 0).all()
    np.testing.assert_allclose(out[0], tile[0, :5, :7], rtol=1e-6)  # a lone tile: its own logits


@pytest.mark.parametrize("window", ["uniform", "hann"])
def test_stitcher_memory_scales_with_the_band_not_the_image(window):
    """Buffers: one tile-high band of float32 logits and weights (plus, for hann, a scratch of at
    most one float32 tile) and the uint8 labels; a taller image costs only its labels."""
    c, (th, tw), w = 4, (16, 96), 96  # th < tw: a band as high as the tile width would show
    short = Stitcher(plan_tiles(200, w, (th, tw), 8), c, window)
    tall = Stitcher(plan_tiles(2000, w, (th, tw), 8), c, window)
    assert tall.buffer_bytes - short.buffer_bytes == (2000 - 200) * w  # the labels only
    scratch = 0 if window == "uniform" else 4 * c * th * tw
    assert short.buffer_bytes <= 4 * (c + 1) * th * w + scratch + 200 * w


def test_pad_tile_limits():
    crop = np.ones((1, 4, 6), np.float32)
    np.testing.assert_array_equal(pad_tile(crop, (4, 6)), crop)  # already tile-sized
    out = np.full((1, 5, 6), 9, np.float32)
    assert pad_tile(crop, (5, 6), "constant", out=out) is out
    assert (out[:, :4] == 1).all() and (out[:, 4] == 0).all()
    for tile in ((3, 6), (4, 5)):
        with pytest.raises(ValueError, match="larger than the tile"):
            pad_tile(crop, tile)
    with pytest.raises(ValueError, match="pad mode"):
        pad_tile(crop, (5, 6), "edge")


def test_batcher_limits():
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        TileBatcher(0, (1, 2, 2))
    batcher = TileBatcher(1, (1, 2, 2), np.float16)
    batcher.slot()[...] = 5
    batch = batcher.commit("k")
    assert batch is not None and batch.keys == ["k"] and batch.tiles.dtype == np.float16
    assert batch.tiles.shape == (1, 1, 2, 2) and (batch.tiles == 5).all()
    assert batcher.flush() is None


def test_stitcher_names_the_one_missing_tile():
    grid = plan_tiles(100, 100, (64, 64), 0)  # 2 x 2 tiles
    stitcher = Stitcher(grid, 2)
    tile = np.zeros((2, 64, 64), np.float32)
    stitcher.add(1, tile)
    with pytest.raises(ValueError, match="tile 2 of row 1 arrived before tile 0$"):
        stitcher.add(2, tile)
    stitcher.add(0, tile)
    stitcher.add(2, tile)
    with pytest.raises(ValueError, match="^1 of 4 tiles not added yet"):
        stitcher.labels()


def test_defaults_and_outputs_written_in_place():
    w = tile_window((4, 6))  # the default window is uniform
    assert w.dtype == np.float32 and (w == 1).all()
    assert tile_window((4, 6), "uniform", borders=(True, False, True, False)).dtype == np.float32
    assert axis_origins(5, 1, 0) == (0, 1, 2, 3, 4)  # 1-pixel tiles are allowed
    image = np.arange(2 * 10 * 12, dtype=np.float32).reshape(2, 10, 12)
    grid = plan_tiles(10, 12, (8, 8), 4)
    buf = np.full((2, 8, 8), -1, np.float32)
    for i in range(grid.count):
        assert extract_tile(image, grid, i, out=buf) is buf
        y0, y1, x0, x1 = grid.box(i)
        np.testing.assert_array_equal(buf, image[:, y0:y1, x0:x1])
