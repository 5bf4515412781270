"""The small-image arena of the torch assembler: the same masks as the numpy path for many small
images of mixed sizes (across batches, through the ring's wrap-around), a constant number of
accumulations per batch, its errors and its memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fcn_deploy.tiling.torch_assembler as assembler_module
from fcn_deploy.tiling import ImageJob, NumpyAssembler, TorchAssembler, plan_tiles
from fcn_deploy.tiling.arena import Slot, arena_bytes, arena_capacity
from fcn_deploy.tiling.torch_assembler import torch_memory_bound
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD

TILE = (16, 24)


def _logits(keys, num_classes, tile_hw, dtype=np.float32):
    """Per tile logits seeded by (image key, tile index): the same whatever the batching."""
    out = np.empty((len(keys), num_classes, *tile_hw), dtype=dtype)
    for i, (job, index) in enumerate(keys):
        out[i] = np.random.default_rng((job.key, index)).standard_normal((num_classes, *tile_hw))
    return out


def _masks(asm, sizes, num_classes, dtype=np.float32, overlap=6):
    rng = np.random.default_rng(0)
    jobs = [ImageJob(k, rng.integers(0, 256, (*hw, 3), dtype=np.uint8), plan_tiles(*hw, asm.tile_hw, overlap))
            for k, hw in enumerate(sizes)]
    done = []
    for batch in asm.batches(jobs):
        result = _logits(batch.keys, num_classes, asm.tile_hw, dtype)
        done += asm.add(batch, result if isinstance(asm, NumpyAssembler) else torch.from_numpy(result), "logits")
    assert [job.key for job in done] == list(range(len(sizes)))  # all finished, in order
    return [job.labels for job in done]


# small (1 tile, several tiles, thinner than a tile, a wide strip of many tiles) and, between
# them, images too large for the arena (banded): the masks must not depend on which path runs
SIZES = [(1, 1), (30, 50), (16, 24), (5, 200), (40, 40), (60, 100), (17, 25), (2, 3), (45, 70), (30, 50)]


@pytest.mark.parametrize("batch_size", [1, 3, 7, 32])
@pytest.mark.parametrize("window,pad_mode", [("hann", "constant"), ("uniform", "reflect")])
def test_arena_masks_equal_numpy(batch_size, window, pad_mode, monkeypatch):
    # 3 classes: a small image has at most 4000 pixels here (the 60x100 one is banded)
    monkeypatch.setattr(assembler_module, "WHOLE_IMAGE_BAND_BYTES", 3 * 4 * 4000)
    args = (TILE, batch_size, IMAGENET_MEAN, IMAGENET_STD)
    kw = dict(window=window, pad_mode=pad_mode)
    expected = _masks(NumpyAssembler(*args, **kw), SIZES, 3)
    th_asm = TorchAssembler(*args, device="cpu", **kw)
    got = _masks(th_asm, SIZES, 3)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == np.uint8
        np.testing.assert_array_equal(g, e)
    assert th_asm.arena is not None and not th_asm.arena._live  # every slot freed
    assert not th_asm.arena.sums[:, 1:].any()  # and zeroed for the next images (slot 0: padding)


def test_arena_wraps_around_and_float16_logits_give_the_same_masks(monkeypatch):
    """More pixels pass through the arena than it holds: the ring wraps, masks stay equal."""
    monkeypatch.setattr(assembler_module, "WHOLE_IMAGE_BAND_BYTES", 2 * 4 * 2000)
    sizes = [(30, 50), (40, 45), (17, 25), (1, 1999), (30, 50)] * 6
    args = (TILE, 2, IMAGENET_MEAN, IMAGENET_STD)
    expected = _masks(NumpyAssembler(*args), sizes, 2, np.float16)
    th_asm = TorchAssembler(*args, device="cpu")
    got = _masks(th_asm, sizes, 2, np.float16)
    assert sum(h * w for h, w in sizes) > 2 * th_asm.arena.capacity  # wrapped at least twice
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)


def test_same_sized_photos_share_one_accumulation_per_batch():
    """A batch of tiles of 8 same-sized photos is accumulated with one index_add_ and reduced with
    one argmax: the device work per batch does not grow with the number of photos in it."""
    from torch.profiler import ProfilerActivity, profile

    grid = plan_tiles(30, 40, TILE, 6)
    assert grid.count > 1
    asm = TorchAssembler(TILE, 8 * grid.count, IMAGENET_MEAN, IMAGENET_STD, device="cpu")
    jobs = [ImageJob(k, np.zeros((30, 40, 3), np.uint8), grid) for k in range(8)]
    (batch,) = list(asm.batches(jobs))
    result = torch.from_numpy(_logits(batch.keys, 5, TILE))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        done = asm.add(batch, result, "logits")
    counts = {e.key: e.count for e in prof.key_averages()}
    assert len(done) == 8 and all(job.labels.shape == (30, 40) for job in done)
    assert counts.get("aten::index_add_") == 1 and counts.get("aten::max") == 1


def test_arena_refuses_tiles_out_of_order_and_wrong_logits():
    asm = TorchAssembler(TILE, 16, IMAGENET_MEAN, IMAGENET_STD, device="cpu")
    job = ImageJob(0, np.zeros((30, 40, 3), np.uint8), plan_tiles(30, 40, TILE, 6))
    (batch,) = list(asm.batches([job]))
    assert len(batch.keys) >= 3
    result = torch.from_numpy(_logits(batch.keys, 3, TILE))
    asm.add(type(batch)(batch.tiles[:1], batch.keys[:1]), result[:1], "logits")
    assert isinstance(job._acc, Slot) and job._acc.added == 1
    with pytest.raises(ValueError, match="tile 2 arrived after 1"):
        asm.add(type(batch)(batch.tiles[2:3], batch.keys[2:3]), result[2:3], "logits")
    with pytest.raises(ValueError, match=r"tile logits have shape \(4, 16, 24\), expected \(3, 16, 24\)"):
        asm.add(type(batch)(batch.tiles[1:2], batch.keys[1:2]), torch.zeros((1, 4, *TILE)), "logits")


def test_saved_logits_and_large_images_stay_out_of_the_arena():
    asm = TorchAssembler(TILE, 4, IMAGENET_MEAN, IMAGENET_STD, device="cpu")
    saved = ImageJob(0, np.zeros((30, 40, 3), np.uint8), plan_tiles(30, 40, TILE, 6),
                     logits_out=lambda c: np.zeros((c, 30, 40), np.float32))
    assert not asm._in_arena(saved, 21) and asm.arena is None
    small = ImageJob(1, np.zeros((30, 40, 3), np.uint8), plan_tiles(30, 40, TILE, 6))
    assert asm._in_arena(small, 21) and asm.arena is not None
    limit = assembler_module.WHOLE_IMAGE_BAND_BYTES // (4 * 21)  # the largest small image, in pixels
    edge = ImageJob(2, None, plan_tiles(2, limit // 2, TILE, 6))
    beyond = ImageJob(3, None, plan_tiles(2, limit // 2 + 1, TILE, 6))
    assert asm._in_arena(edge, 21) and not asm._in_arena(beyond, 21)
    exact = TorchAssembler(TILE, 4, IMAGENET_MEAN, IMAGENET_STD, device="cpu")  # sums of exactly 32 MiB
    assert 4 * 2 * (1 << 20) * 4 == assembler_module.WHOLE_IMAGE_BAND_BYTES
    assert exact._in_arena(ImageJob(4, None, plan_tiles(2, 1 << 20, TILE, 6)), 4)


def test_arena_memory_is_what_the_bound_counts():
    B, C = 32, 21
    th, tw = 320, 480
    band = assembler_module.WHOLE_IMAGE_BAND_BYTES
    assert arena_capacity(B, (th, tw), C, band) == B * th * tw + 3 * (band // (4 * C)) + 1
    assert arena_bytes(B, (th, tw), C, band) == 4 * C * arena_capacity(B, (th, tw), C, band)
    asm = TorchAssembler((16, 24), 2, IMAGENET_MEAN, IMAGENET_STD, device="cpu")
    asm._in_arena(ImageJob(0, None, plan_tiles(30, 40, (16, 24), 6)), 3)
    assert asm.arena.memory_bytes() == arena_bytes(2, (16, 24), 3, band) == asm.arena.sums.nbytes


def test_small_images_stay_within_the_memory_bound(monkeypatch):
    """Everything torch allocates while 24 small photos go through the arena (traced by its
    profiler) stays within torch_memory_bound of one such photo (which counts the arena)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(assembler_module, "WHOLE_IMAGE_BAND_BYTES", 4 * 4 * 3000)
    C, B, tile = 4, 6, (16, 24)
    asm = TorchAssembler(tile, B, IMAGENET_MEAN, IMAGENET_STD, device="cpu")
    grid = plan_tiles(40, 60, tile, 6)
    jobs = [ImageJob(k, np.full((40, 60, 3), k, np.uint8), grid) for k in range(24)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        torch.zeros(1)  # the profiler imports its modules: not in the trace below
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        done = []
        for batch in asm.batches(jobs):
            done += asm.add(batch, batch.tiles[:, :1].expand(-1, C, -1, -1) * 1.0, "logits")
    assert len(done) == 24 and asm.arena is not None
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    peak = int(np.max(np.cumsum([b for _, b in events])))
    bound = torch_memory_bound(grid, C, B)
    assert asm.arena.memory_bytes() <= peak <= bound, (asm.arena.memory_bytes(), peak, bound)


@pytest.mark.gpu
def test_cuda_arena_masks_equal_numpy():
    """On CUDA (index_add_ with atomics): the masks of many small photos, mixed sizes, across
    batches, equal the numpy path's (sums of a few float32 terms: no order effects seen)."""
    sizes = [(375, 500), (500, 375), (1, 1), (320, 480), (333, 500), (375, 500)] * 3
    args = ((320, 480), 8, IMAGENET_MEAN, IMAGENET_STD)
    expected = _masks(NumpyAssembler(*args), sizes, 21, overlap=128)
    asm = TorchAssembler(*args, device="cuda")
    rng = np.random.default_rng(0)
    jobs = [ImageJob(k, rng.integers(0, 256, (*hw, 3), dtype=np.uint8), plan_tiles(*hw, (320, 480), 128))
            for k, hw in enumerate(sizes)]
    done = []
    for batch in asm.batches(jobs):
        assert batch.tiles.shape[0] == 8  # the last batch keeps the batch shape on CUDA
        done += asm.add(batch, torch.from_numpy(_logits(batch.keys, 21, (320, 480))).cuda(), "logits")
    assert [job.key for job in done] == list(range(len(sizes))) and asm.arena is not None
    same = sum(int((job.labels == e).sum()) for job, e in zip(done, expected))
    total = sum(e.size for e in expected)
    assert same == total, f"{total - same} of {total} pixels differ"


def test_short_last_batch_keeps_the_batch_shape(checkpoint_path):
    """With keep_batch_shape (the default on CUDA), every runner call gets the full batch size,
    the zero tiles after the real ones change no mask and are not counted as tiles run."""
    from fcn_deploy.runners.torch_runner import TorchRunner
    from fcn_deploy.infer.segmenter import Segmenter

    rng = np.random.default_rng(5)
    photos = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in [(50, 70), (100, 150), (64, 96)]]
    with TorchRunner(checkpoint_path, tile_hw=(64, 96)) as runner:
        calls = []
        infer = runner._infer_tensor

        def recording(tiles, output):
            calls.append(tuple(tiles.shape))
            return infer(tiles, output)

        runner._infer_tensor = recording
        with Segmenter(runner, batch_size=4, overlap=16, assembler="numpy") as seg:
            expected = [seg.predict(p) for p in photos]
            expected_tiles = seg.tiles_run
        assert expected_tiles == 1 + 4 + 1  # photos of 1, 4 and 1 tiles: two short batches
        with Segmenter(runner, batch_size=4, overlap=16, assembler="torch") as seg:
            assert seg.assembler.keep_batch_shape is False  # the default on the CPU
            seg.assembler.keep_batch_shape = True
            got = [seg.predict(p) for p in photos]
            assert seg.tiles_run == expected_tiles  # zero tiles not counted
        assert calls == [(4, 3, 64, 96)] * 3  # one batch shape only
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)


def test_images_finish_in_order_when_saved_logits_and_the_arena_mix():
    """Images whose logits are saved take the band stitcher, the others the arena: whichever
    path an image takes, the images come back in the order given (a band image finishing right
    after an arena image in one batch included) with the numpy path's masks."""
    # a band image (16x24, logits saved) finishing right before a 1-tile arena image (10x12)
    sizes = [(30, 50), (16, 24), (10, 12), (40, 40), (30, 50), (16, 24), (45, 70)]
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in sizes]
    results = {}
    for asm in (NumpyAssembler(TILE, 6, IMAGENET_MEAN, IMAGENET_STD),
                TorchAssembler(TILE, 6, IMAGENET_MEAN, IMAGENET_STD, device="cpu")):
        jobs = [ImageJob(k, rgb, plan_tiles(*rgb.shape[:2], TILE, 6)) for k, rgb in enumerate(images)]
        for job in jobs[1::2]:  # every second image saves its logits (a 1-tile one among them)
            job.logits_out = lambda c, job=job: np.zeros((c, job.grid.height, job.grid.width), np.float32)
        done = []
        for batch in asm.batches(jobs):
            result = _logits(batch.keys, 3, TILE)
            done += asm.add(batch, result if asm.kind == "numpy" else torch.from_numpy(result), "logits")
        assert [job.key for job in done] == list(range(len(sizes)))
        results[asm.kind] = [job.labels for job in done]
    for e, g in zip(results["numpy"], results["torch"]):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("batch_size", [20, 32])
def test_runs_of_one_size_apart_in_a_batch_and_many_sizes(batch_size):
    """Tiles of same-sized photos separated by a photo of another size (one accumulation per
    size, gathered by position), and more image sizes than the index-map cache holds."""
    # 30x50 photos (9 tiles) 2 tiles apart (a 16x40 photo), then 8 (40x40): batch 20 ends
    # after the second 30x50 photo
    sizes = [(30, 50), (16, 40), (30, 50), (40, 40), (30, 50)] + [(20 + i, 30 + i) for i in range(18)]
    args = (TILE, batch_size, IMAGENET_MEAN, IMAGENET_STD)
    expected = _masks(NumpyAssembler(*args), sizes, 3)
    asm = TorchAssembler(*args, device="cpu")
    got = _masks(asm, sizes, 3)
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)
    assert len(asm.arena._maps) == 16  # the cache keeps the last 16 sizes


def test_allocation_never_overlaps_a_live_image():
    """The ring refuses a slot that would overwrite the oldest live image (the capacity rules
    that out; this checks the guard itself on an arena made too small on purpose)."""
    from fcn_deploy.tiling.arena import SmallImageArena

    arena = SmallImageArena(torch, "cpu", 2, 1, (4, 4), window="uniform", floor=0.1, band_bytes=2 * 4 * 10)
    arena.capacity = 21  # slots 1..20
    a = arena._allocate(8)
    b = arena._allocate(8)
    assert (a.offset, b.offset) == (1, 9)
    arena._live.remove(a)  # the oldest image finished: pixels 1..8 are free again
    c = arena._allocate(8)  # does not fit at 17..24: wraps to 1, ending exactly where b starts
    assert c.offset == 1
    with pytest.raises(AssertionError, match="no room for 4 before 9"):
        arena._allocate(4)  # would start at 9: b is still there
    arena._live.remove(b)
    arena._live.remove(c)
    arena._head = 9
    d = arena._allocate(8)  # [9, 17)
    assert arena._allocate(4).offset == 17  # [17, 21): fits exactly before the end
    with pytest.raises(AssertionError, match="no room for 9 before 9"):
        arena._allocate(9)  # wraps to 1: [1, 10) would run into d at 9
    assert d.offset == 9


def test_arena_add_refuses_tiles_beyond_the_grid():
    asm = TorchAssembler(TILE, 8, IMAGENET_MEAN, IMAGENET_STD, device="cpu")
    job = ImageJob(0, None, plan_tiles(30, 40, TILE, 6))
    assert asm._in_arena(job, 3)
    count = job.grid.count
    result = torch.zeros((count + 1, 3, *TILE))
    with pytest.raises(IndexError, match=rf"tiles \[0, {count + 1}\) out of range \[0, {count}\)"):
        asm.arena.add([(job, 0, 0, count + 1)], result)


def test_arena_checks_its_class_count_and_the_finishing_order():
    from fcn_deploy.tiling.arena import SmallImageArena

    kw = dict(window="hann", floor=0.1, band_bytes=1 << 12)
    for bad in (0, 256):
        with pytest.raises(ValueError, match=rf"num_classes must be in \[1, 255\] for uint8 labels, got {bad}"):
            SmallImageArena(torch, "cpu", bad, 1, (4, 4), **kw)
    for good in (1, 255):
        assert SmallImageArena(torch, "cpu", good, 1, (4, 4), **kw).sums.shape[0] == good
    asm = TorchAssembler(TILE, 8, IMAGENET_MEAN, IMAGENET_STD, device="cpu")
    first, second = (ImageJob(k, None, plan_tiles(16, 24, TILE, 6)) for k in range(2))
    for job in (first, second):
        assert asm._in_arena(job, 3)
        job._acc = asm.arena._allocate(16 * 24)
    with pytest.raises(AssertionError, match="^arena images finish in arrival order$"):
        asm.arena._finish([second])  # the first is still live

