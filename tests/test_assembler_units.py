"""Unit tests of the tile assembler (:mod:`fcn_deploy.tiling.assembler`) on small tiles and CPU
tensors: argument checks and their messages, boundaries, the stage clock, the normalisation
arithmetic, batching, the grid index tensors, the torch stitcher (whole image and ring band)
against the numpy Stitcher, labels output, and the torch memory bound against a traced peak.
The comparisons on full-size tiles and the real model are in ``test_assembler.py``.

Two tricks keep these on the CPU and fast: tiles of 8x12 pixels (grids of a few tiles), and
``WHOLE_IMAGE_BAND_BYTES`` lowered (monkeypatch) so that a small image takes the ring-band path
that only images of many megapixels take in practice. The ``meta`` device (shapes without data)
shows on which device the assembler allocates, which CPU tensors cannot."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from fcn_deploy.tiling import (
    HANN_FLOOR,
    ImageJob,
    NumpyAssembler,
    StageClock,
    Stitcher,
    TorchAssembler,
    TorchStitcher,
    make_assembler,
    plan_tiles,
)
from fcn_deploy.tiling import torch_assembler as assembler_module
from fcn_deploy.tiling.assembler import Batch
from fcn_deploy.tiling.torch_assembler import GridIndex, torch_memory_bound
from fcn_deploy.tiling.grid import axis_window
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD

TILE = (8, 12)
KINDS = ("numpy", "torch")

# The first operation on the meta device loads torch's meta kernels (~1 s): done at import, so that
# it is paid once per session (and once per mutation run, in mutmut's fork server), not per test.
torch.empty(1, device="meta").add_(1)


def grid_of(h: int, w: int, tile=TILE, overlap: int = 3):
    """Tiles of ``tile`` overlapping by ``overlap``, origins not aligned (align 1)."""
    return plan_tiles(h, w, tile, overlap, align=1)


def make(kind: str, batch_size: int = 3, tile=TILE, **kw):
    cls = NumpyAssembler if kind == "numpy" else TorchAssembler
    return cls(tile, batch_size, IMAGENET_MEAN, IMAGENET_STD, **kw)


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def tile_logits(key, index: int, num_classes: int, tile=TILE) -> np.ndarray:
    """(C, th, tw) float32 logits of tile ``index`` of image ``key``: the same whatever the batching."""
    return np.random.default_rng((key, index)).standard_normal((num_classes, *tile), dtype=np.float32)


def reference(grid, num_classes: int, key, window: str = "hann", floor: float = HANN_FLOOR, out_dtype=None):
    """Labels and (when ``out_dtype``) averaged logits of the numpy Stitcher for ``tile_logits``."""
    out = None if out_dtype is None else np.zeros((num_classes, grid.height, grid.width), out_dtype)
    stitcher = Stitcher(grid, num_classes, window, out, floor)
    for i in range(grid.count):
        stitcher.add(i, tile_logits(key, i, num_classes, grid.tile_hw))
    return stitcher.labels().copy(), out


def expected_tiles(rgb: np.ndarray, grid, pad_mode: str) -> np.ndarray:
    """(count, 3, th, tw) float64: ``(x / 255 - mean) / std`` of each tile's pixels, padded."""
    mean = np.asarray(IMAGENET_MEAN)[:, None, None]
    std = np.asarray(IMAGENET_STD)[:, None, None]
    th, tw = grid.tile_hw
    tiles = []
    for i in range(grid.count):
        y0, y1, x0, x1 = grid.box(i)
        norm = (rgb[y0:y1, x0:x1].transpose(2, 0, 1) / 255.0 - mean) / std
        pad = ((0, 0), (0, th - (y1 - y0)), (0, tw - (x1 - x0)))
        tiles.append(np.pad(norm, pad, mode="reflect") if pad_mode == "reflect" else np.pad(norm, pad))
    return np.stack(tiles)


def as_numpy(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.numpy()


def run(asm, images, num_classes: int, out_dtype=None, result_dtype=np.float32, order=None):
    """All ``images`` through ``asm`` with ``tile_logits`` as the runner. ``order(keys)`` may
    permute each batch's tiles. Returns (finished jobs, saved logits by key, logits_out calls)."""
    jobs = [ImageJob(k, rgb, grid) for k, (rgb, grid) in enumerate(images)]
    saved, calls = {}, []
    if out_dtype is not None:
        for job in jobs:
            def logits_out(c, job=job):
                calls.append((job.key, c))
                return saved.setdefault(job.key, np.zeros((c, job.grid.height, job.grid.width), out_dtype))
            job.logits_out = logits_out
    done = []
    for batch in asm.batches(jobs):
        keys = order(batch.keys) if order else batch.keys
        logits = np.stack([tile_logits(job.key, i, num_classes, asm.tile_hw) for job, i in keys]).astype(result_dtype)
        result = logits if asm.kind == "numpy" else torch.from_numpy(logits)
        done += asm.add(Batch(batch.tiles, list(keys)), result, "logits")
    return done, saved, calls


@pytest.fixture
def banded(monkeypatch):
    """Every image takes the torch stitcher's ring band of one tile row (as a photo of many
    megapixels does), not the whole-image band."""
    monkeypatch.setattr(assembler_module, "WHOLE_IMAGE_BAND_BYTES", 0)


@pytest.fixture
def float64_default():
    """torch's default dtype float64 for one test: the assembler's buffers must stay float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# --- StageClock ---------------------------------------------------------------------------

def test_stage_clock_sums_seconds_per_stage_over_calls_and_threads():
    clock = StageClock()
    assert clock.seconds["decode"] == 0.0  # a stage never timed reads 0
    clock.add("engine", 0.25)
    clock.add("engine", 0.5)
    clock.add("encode", 2.0)
    assert clock.seconds["engine"] == 0.75 and clock.seconds["encode"] == 2.0
    errors = []

    def work():
        try:
            for _ in range(2000):
                clock.add("stitch", 0.5)
        except Exception as exc:  # an exception in a thread would otherwise pass unnoticed
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert clock.seconds["stitch"] == 4 * 2000 * 0.5  # no update lost between threads


def test_stage_clock_context_times_the_block_even_when_it_raises():
    clock = StageClock()
    with clock("decode"):
        time.sleep(0.02)
    with pytest.raises(RuntimeError), clock("decode"):
        time.sleep(0.02)
        raise RuntimeError("decoder failed")
    assert 0.04 <= clock.seconds["decode"] < 2.0
    assert set(clock.seconds) == {"decode"}


# --- Assembler arguments, normalisation, make_assembler ----------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_assembler_arguments_are_checked_and_kept(kind):
    with pytest.raises(ValueError, match=r"batch size must be >= 1, got 0"):
        make(kind, batch_size=0)
    with pytest.raises(ValueError, match=r"window must be one of \('uniform', 'hann'\), not 'gauss'"):
        make(kind, window="gauss")
    with pytest.raises(ValueError, match=r"pad mode must be one of \('reflect', 'constant'\), not 'edge'"):
        make(kind, pad_mode="edge")
    cls = NumpyAssembler if kind == "numpy" else TorchAssembler
    asm = cls((np.int64(8), 12.0), np.int32(1), [0.5, 0.25, 0.75], np.array([0.5, 0.5, 0.25]),
              window="uniform", pad_mode="reflect", floor=0.3)
    assert asm.tile_hw == (8, 12) and all(type(v) is int for v in asm.tile_hw)
    assert asm.batch_size == 1 and type(asm.batch_size) is int
    assert asm.mean == (0.5, 0.25, 0.75) and asm.std == (0.5, 0.5, 0.25)
    assert all(type(v) is float for v in asm.mean + asm.std)
    assert (asm.window, asm.pad_mode, asm.floor) == ("uniform", "reflect", 0.3)
    assert isinstance(asm.clock, StageClock)


@pytest.mark.parametrize("kind", KINDS)
def test_scale_and_shift_are_the_float32_arithmetic_of_the_docstring(kind):
    asm = make(kind)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1)
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
    assert asm.scale.dtype == np.float32 and asm.scale.shape == (3, 1, 1)
    assert asm.shift.dtype == np.float32 and asm.shift.shape == (3, 1, 1)
    np.testing.assert_array_equal(asm.scale, np.float32(1) / (np.float32(255) * std))
    np.testing.assert_array_equal(asm.shift, mean / std)


def test_make_assembler_kinds_devices_and_arguments():
    kw = dict(tile_hw=TILE, batch_size=2, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    custom = dict(window="uniform", pad_mode="reflect", floor=0.3)
    assert make_assembler(**kw).kind == "numpy"  # auto, default device cpu
    assert make_assembler(device="cpu:0", **kw).kind == "numpy"
    assert make_assembler("numpy", device="cpu", **kw).kind == "numpy"
    for kind, device in (("auto", "meta"), ("torch", "meta"), ("torch", "cpu")):
        asm = make_assembler(kind, device=device, **kw, **custom)
        assert asm.kind == "torch" and asm.device == torch.device(device)
        assert (asm.window, asm.pad_mode, asm.floor) == ("uniform", "reflect", 0.3)
        assert (asm.tile_hw, asm.batch_size) == (TILE, 2)
    asm = make_assembler("numpy", **kw, **custom)
    assert (asm.window, asm.pad_mode, asm.floor, asm.tile_hw, asm.batch_size) == ("uniform", "reflect", 0.3, TILE, 2)
    with pytest.raises(ValueError, match=r"assembler must be one of \('auto', 'numpy', 'torch'\), not 'jax'"):
        make_assembler("jax", **kw)
    with pytest.raises(ValueError, match="the numpy assembler needs a CPU runner, not one on cuda:1"):
        make_assembler("numpy", device="cuda:1", **kw)


def test_torch_assembler_defaults_to_the_cpu():
    asm = TorchAssembler(TILE, 2, IMAGENET_MEAN, IMAGENET_STD)
    assert asm.device == torch.device("cpu")


# --- tiles and batches -------------------------------------------------------------------

@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
@pytest.mark.parametrize("kind", KINDS)
def test_tiles_are_normalised_and_padded_pixels(kind, pad_mode):
    """Tiles of images smaller than, equal to and larger than a tile (1-pixel axes included)
    equal ``(x / 255 - mean) / std``, padded with zeros or reflected pixels."""
    asm = make(kind, batch_size=64, pad_mode=pad_mode)
    for i, hw in enumerate([(1, 1), (5, 7), (8, 12), (7, 12), (8, 11), (1, 30), (20, 1), (20, 30)]):
        rgb, grid = photo(*hw, seed=i), grid_of(*hw)
        (batch,) = asm.batches([ImageJob(0, rgb, grid)])
        tiles = as_numpy(batch.tiles)
        assert tiles.dtype == np.float32 and tiles.shape == (grid.count, 3, *TILE)
        np.testing.assert_allclose(tiles, expected_tiles(rgb, grid, pad_mode), rtol=0, atol=2e-6)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_torch_tiles_equal_numpy_tiles_bit_for_bit(pad_mode):
    images = [(photo(*hw, seed=i), grid_of(*hw)) for i, hw in enumerate([(5, 7), (20, 30), (8, 12), (1, 25)])]
    tiles = {}
    for kind in KINDS:
        asm = make(kind, batch_size=4, pad_mode=pad_mode)
        jobs = [ImageJob(k, rgb, grid) for k, (rgb, grid) in enumerate(images)]
        tiles[kind] = np.concatenate([as_numpy(b.tiles) for b in asm.batches(jobs)])
    np.testing.assert_array_equal(tiles["torch"], tiles["numpy"])


@pytest.mark.parametrize("batch_size", [1, 2, 4, 5, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_batches_hold_every_tile_in_order_in_fresh_buffers(kind, batch_size):
    """Batches of ``batch_size`` tiles (the last one shorter) over several images, tiles of one
    image in row-major order, a batch ending one image and starting the next; every batch is a
    buffer of its own (the runner may still read the previous one)."""
    images = [(photo(*hw, seed=i), grid_of(*hw)) for i, hw in enumerate([(5, 7), (20, 30), (13, 12), (8, 25)])]
    jobs = [ImageJob(k, rgb, grid) for k, (rgb, grid) in enumerate(images)]
    asm = make(kind, batch_size=batch_size)
    batches = list(asm.batches(jobs))
    keys = [(job.key, i) for b in batches for job, i in b.keys]
    assert keys == [(k, i) for k, (_, grid) in enumerate(images) for i in range(grid.count)]
    total = len(keys)
    assert [len(b.keys) for b in batches] == [batch_size] * (total // batch_size) + (
        [total % batch_size] if total % batch_size else [])
    for b in batches:
        assert tuple(b.tiles.shape) == (len(b.keys), 3, *TILE)
        assert all(job is jobs[job.key] for job, _ in b.keys)
    got = np.concatenate([as_numpy(b.tiles) for b in batches])  # read after all were made
    want = np.concatenate([expected_tiles(rgb, grid, "constant") for rgb, grid in images])
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_torch_batches_of_a_non_contiguous_image():
    rgb = photo(20, 30)
    flipped = rgb[::-1, ::-1]  # negative strides: torch.from_numpy refuses those
    asm = make("torch", batch_size=64)
    (got,) = asm.batches([ImageJob(0, flipped, grid_of(20, 30))])
    (want,) = asm.batches([ImageJob(0, flipped.copy(), grid_of(20, 30))])
    np.testing.assert_array_equal(got.tiles.numpy(), want.tiles.numpy())


def test_torch_buffers_live_on_the_assemblers_device():
    """On the meta device (shapes only, no data): batches, index tensors, normalisation
    constants, band and weights are allocated on the assembler's device, never on the CPU."""
    meta = torch.device("meta")
    for window, pad_mode in (("hann", "constant"), ("uniform", "reflect")):
        asm = make("torch", batch_size=2, device="meta", window=window, pad_mode=pad_mode)
        grid = grid_of(5, 30)
        jobs = [ImageJob(0, photo(5, 30), grid)]
        batches = list(asm.batches(jobs))
        assert [b.tiles.device for b in batches] == [meta] * len(batches)
        ix = asm.index(grid)
        tensors = [ix.tile_row, ix.tile_col, ix.row_pixels, ix.col_pixels, ix.col_targets]
        tensors += [t for t in (ix.pad_mask, ix.win_rows, ix.win_cols) if t is not None]
        assert {t.device for t in tensors} == {meta}
        stitcher = TorchStitcher(asm, grid, 3, np.zeros((3, 5, 30), np.float16))
        assert stitcher.band.device == meta and stitcher.weight.device == meta
        # one tile row, all but the last tile: accumulated on the device (the argmax would
        # need data); the uniform window's weights are made on the device too
        stitcher.add_group(0, torch.zeros((grid.count - 1, 3, *TILE), device=meta))
        assert stitcher.rows_done == 0


def test_torch_buffers_are_float32_whatever_the_default_dtype(float64_default):
    for window in ("hann", "uniform"):
        asm = make("torch", batch_size=4, window=window)
        grid = grid_of(13, 20)
        (batch,) = asm.batches([ImageJob(0, photo(13, 20), grid)])
        assert batch.tiles.dtype == torch.float32
        out = np.zeros((3, 13, 20), np.float32)
        stitcher = TorchStitcher(asm, grid, 3, out)
        assert stitcher.band.dtype == torch.float32 and stitcher.weight.dtype == torch.float32
        for i in range(grid.count):
            stitcher.add(i, torch.from_numpy(tile_logits(0, i, 3)))
        labels, want = reference(grid, 3, 0, window, out_dtype=np.float32)
        np.testing.assert_array_equal(stitcher.labels(), labels)
        np.testing.assert_array_equal(out, want)


# --- the grid index of the torch assembler ------------------------------------------------

@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_grid_index_tensors(pad_mode):
    asm = make("torch", pad_mode=pad_mode, floor=0.2)
    th, tw = TILE
    for h, w in [(5, 30), (20, 7), (1, 1), (20, 30), (8, 12)]:
        grid = grid_of(h, w)
        ix = GridIndex(asm, grid)
        assert ix.grid == grid
        np.testing.assert_array_equal(ix.tile_row.numpy(), np.arange(grid.count) // grid.cols)
        np.testing.assert_array_equal(ix.tile_col.numpy(), np.arange(grid.count) % grid.cols)
        for got, origins, n, size in ((ix.row_pixels, grid.ys, min(h, th), th),
                                      (ix.col_pixels, grid.xs, min(w, tw), tw)):
            if n == size:
                base = np.arange(size)
            elif pad_mode == "reflect":
                base = np.pad(np.arange(n), (0, size - n), mode="reflect")
            else:
                base = np.minimum(np.arange(size), n - 1)  # clamped, then masked
            assert got.dtype == torch.int64
            np.testing.assert_array_equal(got.numpy(), np.asarray(origins)[:, None] + base)
        assert ix.col_targets.dtype == torch.int64
        np.testing.assert_array_equal(ix.col_targets.numpy(), np.asarray(grid.xs)[:, None] + np.arange(min(w, tw)))
        if pad_mode == "constant" and (h < th or w < tw):
            mask = np.zeros((1, 1, th, tw), bool)
            mask[..., : min(h, th), : min(w, tw)] = True
            np.testing.assert_array_equal(ix.pad_mask.numpy(), mask)
        else:
            assert ix.pad_mask is None
        for got, n, size in ((ix.win_rows, grid.rows, th), (ix.win_cols, grid.cols, tw)):
            assert got.dtype == torch.float32
            want = [axis_window(size, "hann", 0.2, i == 0, i == n - 1) for i in range(n)]
            np.testing.assert_array_equal(got.numpy(), np.stack(want))


def test_grid_index_of_the_uniform_window_has_no_windows():
    ix = GridIndex(make("torch", window="uniform"), grid_of(20, 30))
    assert ix.win_rows is None and ix.win_cols is None


def test_index_cache_keeps_the_last_16_image_sizes():
    asm = make("torch")
    grids = [grid_of(5, w) for w in range(1, 18)]
    first = [asm.index(g) for g in grids[:16]]
    assert all(asm.index(g) is ix for g, ix in zip(grids[:16], first))  # all 16 cached
    asm.index(grids[16])  # a 17th size evicts the oldest one
    assert asm.index(grids[1]) is first[1]
    assert asm.index(grids[0]) is not first[0]


def test_index_of_another_tiling_of_the_same_size():
    asm = make("torch")
    grid = grid_of(5, 30)
    cached = asm.index(grid)
    other = grid_of(5, 30, overlap=0, tile=(8, 13))
    assert asm.index(other).grid == other
    assert asm.index(grid).grid == grid and asm.index(grid) is not cached


# --- stitching: the torch stitcher against the numpy Stitcher -----------------------------

SIZES = [(5, 7), (8, 12), (20, 30), (13, 40), (31, 12), (1, 25), (25, 1)]


@pytest.mark.parametrize("band", ["whole", "banded"])
@pytest.mark.parametrize("window", ["hann", "uniform"])
def test_torch_stitcher_equals_numpy_stitcher(window, band, monkeypatch):
    """Labels and averaged logits (float32 and float16) of the torch stitcher, tile by tile,
    equal the numpy Stitcher's, with the whole image in its band or a ring band of one tile row."""
    if band == "banded":
        monkeypatch.setattr(assembler_module, "WHOLE_IMAGE_BAND_BYTES", 0)
    asm = make("torch", window=window, floor=0.05)
    for key, hw in enumerate(SIZES):
        grid = grid_of(*hw)
        for out_dtype in (np.float32, np.float16):
            out = np.zeros((4, *hw), out_dtype)
            stitcher = TorchStitcher(asm, grid, 4, out)
            assert stitcher.whole == (band == "whole")
            assert tuple(stitcher.band.shape) == (4, hw[0] if band == "whole" else min(hw[0], TILE[0]), hw[1])
            for i in range(grid.count):
                stitcher.add(i, torch.from_numpy(tile_logits(key, i, 4)))
            labels, want = reference(grid, 4, key, window, 0.05, out_dtype)
            got = stitcher.labels()
            assert got.dtype == np.uint8 and got.shape == hw
            np.testing.assert_array_equal(got, labels)
            np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("band", ["whole", "banded"])
def test_torch_stitcher_finalises_rows_as_the_numpy_stitcher(band, monkeypatch):
    """Banded, the rows above a new tile row are final when it starts (rows_done), and the
    labels of a stitcher without saved logits equal the numpy Stitcher's; whole, everything is
    finalised once at the end."""
    if band == "banded":
        monkeypatch.setattr(assembler_module, "WHOLE_IMAGE_BAND_BYTES", 0)
    asm = make("torch")
    grid = grid_of(31, 30)
    assert grid.rows >= 4
    stitcher = TorchStitcher(asm, grid, 3)
    assert stitcher.weight is None
    for i in range(grid.count):
        stitcher.add(i, torch.from_numpy(tile_logits(7, i, 3)))
        row = i // grid.cols
        if i + 1 < grid.count:
            want = grid.ys[row] if band == "banded" else 0
            assert stitcher.rows_done == want and not stitcher.done
    assert stitcher.done and stitcher.rows_done == 31
    np.testing.assert_array_equal(stitcher.labels(), reference(grid, 3, 7)[0])


def test_whole_image_band_boundary(monkeypatch):
    asm = make("torch")
    grid = grid_of(20, 30)
    monkeypatch.setattr(assembler_module, "WHOLE_IMAGE_BAND_BYTES", 5 * 20 * 30 * 4)
    assert TorchStitcher(asm, grid, 5).whole
    monkeypatch.setattr(assembler_module, "WHOLE_IMAGE_BAND_BYTES", 5 * 20 * 30 * 4 - 1)
    stitcher = TorchStitcher(asm, grid, 5)
    assert not stitcher.whole and tuple(stitcher.band.shape) == (5, TILE[0], 30)


def test_torch_stitcher_nan_is_void_and_ties_go_to_the_first_class(banded):
    asm = make("torch")
    grid = grid_of(20, 12)
    stitcher = TorchStitcher(asm, grid, 3)
    for i in range(grid.count):
        logits = np.zeros((3, *TILE), np.float32)
        logits[1:] = 1.0  # classes 1 and 2 tie everywhere
        if i == 0:
            logits[0, 0, 0] = np.nan
        stitcher.add(i, torch.from_numpy(logits))
    labels = stitcher.labels()
    assert labels[0, 0] == 255
    labels[0, 0] = 1
    assert (labels == 1).all()


def test_torch_stitcher_arguments(banded):
    asm = make("torch")
    grid = grid_of(5, 7)
    for bad in (0, 256):
        with pytest.raises(ValueError, match=rf"num_classes must be in \[1, 255\] for uint8 labels, got {bad}"):
            TorchStitcher(asm, grid, bad)
    for good in (1, 255):  # one class: all zeros; 255 classes: ids up to 254
        stitcher = TorchStitcher(asm, grid, good)
        logits = np.zeros((good, *TILE), np.float32)
        logits[-1] = 1.0
        stitcher.add(0, torch.from_numpy(logits))
        assert (stitcher.labels() == good - 1).all()
    with pytest.raises(ValueError, match=r"logits_out has shape \(2, 5, 7\), expected \(3, 5, 7\)"):
        TorchStitcher(asm, grid, 3, np.zeros((2, 5, 7), np.float16))


def test_torch_stitcher_refuses_bad_tiles_with_clear_messages(banded):
    asm = make("torch")
    grid = grid_of(13, 30)  # 2 rows of 3 tiles
    assert (grid.rows, grid.cols) == (2, 3)
    stitcher = TorchStitcher(asm, grid, 2)

    def tiles(k, classes=2, hw=TILE):
        return torch.zeros((k, classes, *hw))

    with pytest.raises(ValueError, match=r"tile logits have shape \(3, 8, 12\), expected \(2, 8, 12\)"):
        stitcher.add_group(0, tiles(1, classes=3))
    with pytest.raises(ValueError, match=r"tile logits have shape \(2, 8, 11\), expected \(2, 8, 12\)"):
        stitcher.add(0, torch.zeros((2, 8, 11)))
    with pytest.raises(IndexError, match=r"tiles \[-1, 0\) out of range \[0, 6\)"):
        stitcher.add_group(-1, tiles(1))
    with pytest.raises(IndexError, match=r"tiles \[5, 7\) out of range \[0, 6\)"):
        stitcher.add_group(5, tiles(2))
    with pytest.raises(IndexError, match=r"tiles \[6, 7\) out of range \[0, 6\)"):
        stitcher.add(6, tiles(1)[0])
    with pytest.raises(ValueError, match=r"tiles \[2, 4\) span more than one tile row"):
        stitcher.add_group(2, tiles(2))
    with pytest.raises(ValueError, match=r"tile 3 of row 1 arrived before tile 2"):
        stitcher.add_group(0, tiles(2))
        stitcher.add_group(3, tiles(1))
    with pytest.raises(ValueError, match=r"tile 1 was added twice"):
        stitcher.add_group(1, tiles(2))
    with pytest.raises(ValueError, match=r"4 of 6 tiles not added yet"):
        stitcher.labels()
    stitcher.add(2, tiles(1)[0])
    stitcher.add(4, tiles(1)[0])  # any order within a tile row
    with pytest.raises(ValueError, match=r"tile 4 was added twice"):  # the first added one of the group
        stitcher.add_group(3, tiles(3))
    stitcher.add(3, tiles(1)[0])
    stitcher.add_group(5, tiles(1))  # the last tile: first + k == count
    assert stitcher.done and (stitcher.labels() == 0).all()


def test_torch_stitcher_labels_later_returns_the_labels(banded):
    asm = make("torch")
    grid = grid_of(13, 20)
    stitcher = TorchStitcher(asm, grid, 3)
    for i in range(grid.count):
        stitcher.add(i, torch.from_numpy(tile_logits(3, i, 3)))
    later = stitcher.labels_later()
    np.testing.assert_array_equal(later(), reference(grid, 3, 3)[0])


def test_saved_logits_are_timed_as_download():
    asm = make("torch")
    grid = grid_of(13, 20)
    stitcher = TorchStitcher(asm, grid, 3, np.zeros((3, 13, 20), np.float16))
    for i in range(grid.count):
        stitcher.add(i, torch.from_numpy(tile_logits(3, i, 3)))
    assert asm.clock.seconds["download"] > 0


# --- the assemblers end to end on small tiles ---------------------------------------------

def _row_runs(keys):
    """(i, j) per run of keys[i:j]: consecutive tiles of one image's tile row."""
    i = 0
    while i < len(keys):
        job, first = keys[i]
        j = i + 1
        while j < len(keys) and keys[j][0] is job and keys[j][1] // job.grid.cols == first // job.grid.cols:
            j += 1
        yield i, j
        i = j


def _rows_shuffled(keys, seed=5):
    """The tiles of each image's tile row in a random order."""
    rng = np.random.default_rng(seed)
    return [keys[k] for i, j in _row_runs(keys) for k in i + rng.permutation(j - i)]


def _rows_reversed(keys):
    """The tiles of each image's tile row in reverse order (the stitchers accept any order
    within a row)."""
    return [key for i, j in _row_runs(keys) for key in keys[i:j][::-1]]


@pytest.mark.parametrize("order", [None, _rows_reversed, _rows_shuffled], ids=["in-order", "rows-reversed", "shuffled"])
@pytest.mark.parametrize("batch_size", [1, 2, 5, 7])
@pytest.mark.parametrize("kind", KINDS)
def test_assembler_labels_and_logits_equal_the_numpy_stitcher(kind, batch_size, order, banded):
    """Several images through ``batches``/``add`` (batches that split tile rows and images):
    finished in order, each once, labels and saved logits as the numpy Stitcher's; the logits
    file is asked for once per image, with the class count."""
    images = [(photo(*hw, seed=k), grid_of(*hw)) for k, hw in enumerate([(20, 30), (5, 7), (13, 40), (31, 12)])]
    asm = make(kind, batch_size=batch_size, window="hann", floor=0.3)
    done, saved, calls = run(asm, images, 4, np.float16, order=order)
    assert [job.key for job in done] == [0, 1, 2, 3]
    assert sorted(calls) == [(k, 4) for k in range(4)]
    for job, (_, grid) in zip(done, images):
        labels, logits = reference(grid, 4, job.key, "hann", 0.3, np.float16)
        assert job.finished and job.labels.dtype == np.uint8
        np.testing.assert_array_equal(job.labels, labels)
        np.testing.assert_array_equal(saved[job.key], logits)


@pytest.mark.parametrize("kind", KINDS)
def test_assembler_without_saved_logits_and_float16_results(kind):
    images = [(photo(*hw, seed=k), grid_of(*hw)) for k, hw in enumerate([(20, 30), (13, 40)])]
    asm = make(kind, batch_size=4, window="uniform")
    done, saved, _ = run(asm, images, 3, result_dtype=np.float16)
    assert saved == {}
    for job, (_, grid) in zip(done, images):
        out = np.zeros((3, grid.height, grid.width), np.float32)
        stitcher = Stitcher(grid, 3, "uniform", out)
        for i in range(grid.count):
            stitcher.add(i, tile_logits(job.key, i, 3).astype(np.float16))
        np.testing.assert_array_equal(job.labels, stitcher.labels())


@pytest.mark.parametrize("kind", KINDS)
def test_labels_output_for_single_tile_images(kind):
    """Single-tile images may take (n, th, tw) labels from the runner: cropped to the image,
    uint8, every job finished in order; an image of several tiles is refused."""
    sizes = [(5, 7), (8, 12), (1, 12), (8, 1)]
    jobs = [ImageJob(k, photo(*hw), grid_of(*hw)) for k, hw in enumerate(sizes)]
    asm = make(kind, batch_size=3)
    done = []
    for batch in asm.batches(jobs):
        assert batch.single_tiles
        labels = np.stack([np.arange(96).reshape(TILE) + 10 * job.key for job, _ in batch.keys]).astype(np.int64)
        result = labels if kind == "numpy" else torch.from_numpy(labels)
        assert not any(job.finished for job, _ in batch.keys)
        done += asm.add(batch, result, "labels")
    assert [job.key for job in done] == [0, 1, 2, 3]
    for job, (h, w) in zip(done, sizes):
        assert job.finished
        assert job.labels.dtype == np.uint8 and job.labels.shape == (h, w)
        np.testing.assert_array_equal(job.labels, (np.arange(96).reshape(TILE) + 10 * job.key)[:h, :w])
    big = ImageJob(9, photo(9, 12), grid_of(9, 12))
    (batch,) = asm.batches([big])
    assert not batch.single_tiles
    zeros = np.zeros((2, *TILE), np.uint8)
    with pytest.raises(ValueError, match="^labels output for an image of (2|several) tiles: logits are needed$"):
        asm.add(batch, zeros if kind == "numpy" else torch.from_numpy(zeros), "labels")


# --- the memory bound of the torch assembler ----------------------------------------------

def _torch_cpu_peak(prof) -> int:
    """Peak bytes held by torch's CPU allocator while profiled by ``prof``."""
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    assert events, "the profiler recorded no allocation"
    return int(np.max(np.cumsum([b for _, b in events])))


@pytest.mark.parametrize("band,save", [("whole", False), ("whole", True), ("banded", False), ("banded", True)])
def test_torch_memory_bound_holds_on_a_small_grid(band, save, monkeypatch):
    """Everything torch allocates while a 200x300 image goes through the torch assembler (its
    averaged logits saved or not) stays within :func:`torch_memory_bound` (less the uint8 image,
    which on CPU tensors is the numpy array's own memory). The 8000x8000 case is in
    test_assembler.py (slow)."""
    from torch.profiler import ProfilerActivity, profile

    if band == "banded":
        monkeypatch.setattr(assembler_module, "WHOLE_IMAGE_BAND_BYTES", 0)
    H, W, C, B, tile = 200, 300, 5, 3, (32, 48)
    asm = make("torch", batch_size=B, tile=tile)
    job = ImageJob(0, np.full((H, W, 3), 128, np.uint8), plan_tiles(H, W, tile, 8, align=1))
    if save:
        job.logits_out = lambda c: np.zeros((c, H, W), np.float16)

    def assemble():
        for batch in asm.batches([job]):
            asm.add(batch, batch.tiles[:, :1].expand(-1, C, -1, -1) * 2.0, "logits")  # fresh logits

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        torch.zeros(1)  # the profiler imports its modules: not in the trace below
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        assemble()
    assert job.labels is not None and job.labels.shape == (H, W)
    peak = _torch_cpu_peak(prof)
    bound = torch_memory_bound(job.grid, C, B) - 3 * H * W
    assert 0 < peak <= bound, (peak, bound)


@pytest.mark.parametrize("hw,num_classes,batch", [
    ((375, 500), 21, 32), ((3000, 4000), 21, 8), ((40, 7000), 3, 5),
    # around the small-image limit: 84 MB of sums, 31.9 MB, exactly 32 MiB
    ((1000, 1000), 21, 4), ((380, 1000), 21, 4), ((2048, 4096), 1, 4),
])
def test_torch_memory_bound_is_the_documented_formula(hw, num_classes, batch):
    """torch_memory_bound is the formula of the assembler's docstring and the README, term by
    term (the traced-peak tests only show it is not too low)."""
    H, W = hw
    C, B = num_classes, batch
    th, tw = 320, 480
    grid = plan_tiles(H, W, (th, tw))
    band = assembler_module.WHOLE_IMAGE_BAND_BYTES
    small = C * H * W * 4 <= band
    R = H if small else min(th, H)
    expected = (3 * H * W  # the uint8 image
                + (C + 1) * R * W * 4  # band and weights
                + 14 * R * W  # argmax temporaries
                + 6 * C * R * W  # saved logits' float32 mean and float16 copy
                + 2 * B * C * th * tw * 4 + 7 * B * th * tw  # one group's temporaries
                + 40 * (grid.count + grid.rows * th + grid.cols * tw)  # the grid's index tensors
                + 6 * B * 3 * th * tw * 4 + 3 * B * C * th * tw * 4)  # batches in flight, results
    if small:  # the arena, its argmax temporaries and index maps
        P = band // (4 * C)
        expected += 4 * C * (B * th * tw + 3 * P + 1) + 14 * (B * th * tw + P) + 12 * (grid.rows * th + grid.cols * tw)
    assert torch_memory_bound(grid, C, B) == expected
