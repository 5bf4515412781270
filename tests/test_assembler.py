"""The tile assembler: torch tensors (on CPU here) against the numpy path, and its memory bound."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from fcn_deploy.tiling import (
    ImageJob,
    NumpyAssembler,
    TorchAssembler,
    make_assembler,
    plan_tiles,
)
from fcn_deploy.tiling.torch_assembler import WHOLE_IMAGE_BAND_BYTES, torch_memory_bound
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD, TILE_HW


def _assemblers(batch_size: int = 4, tile_hw=TILE_HW, **kw):
    args = (tile_hw, batch_size, IMAGENET_MEAN, IMAGENET_STD)
    return NumpyAssembler(*args, **kw), TorchAssembler(*args, device="cpu", **kw)


def _fake_logits(tiles: np.ndarray, keys, num_classes: int, dtype=np.float32) -> np.ndarray:
    """Per tile logits drawn from a generator seeded by (image key, tile index): the same
    numbers for both assemblers whatever the batching."""
    out = np.empty((len(keys), num_classes, *tiles.shape[2:]), dtype=dtype)
    for i, (job, index) in enumerate(keys):
        rng = np.random.default_rng((job.key, index))
        out[i] = rng.standard_normal((num_classes, *tiles.shape[2:]), dtype=np.float32)
    return out


def _run(asm, images, num_classes, dtype=np.float32, logits=False):
    jobs = [ImageJob(k, rgb, plan_tiles(*rgb.shape[:2], asm.tile_hw)) for k, rgb in enumerate(images)]
    saved = {}
    if logits:
        for job in jobs:
            job.logits_out = lambda c, job=job: saved.setdefault(
                job.key, np.zeros((c, job.grid.height, job.grid.width), np.float16))
    done = []
    for batch in asm.batches(jobs):
        tiles = batch.tiles if isinstance(batch.tiles, np.ndarray) else batch.tiles.numpy()
        result = _fake_logits(tiles, batch.keys, num_classes, dtype)
        if isinstance(asm, TorchAssembler):
            result = torch.from_numpy(result)
        done += asm.add(batch, result, "logits")
    assert [job.key for job in done] == list(range(len(images)))  # in order, all finished
    return [job.labels for job in done], saved


@pytest.mark.parametrize("hw,num_classes", [((1, 1), 21), ((5, 7), 21), ((321, 481), 21), ((3000, 4000), 3)])
def test_torch_assembler_masks_equal_numpy_on_random_logits(hw, num_classes):
    rgb = np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8)
    np_asm, th_asm = _assemblers()
    (expected,), _ = _run(np_asm, [rgb], num_classes)
    (got,), _ = _run(th_asm, [rgb], num_classes)
    assert got.shape == hw and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("window", ["hann", "uniform"])
def test_torch_assembler_equal_numpy_across_images_float16_and_saved_logits(window):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in [(5, 7), (700, 900), (320, 481)]]
    np_asm, th_asm = _assemblers(batch_size=3, window=window)
    exp_labels, exp_logits = _run(np_asm, images, 5, np.float16, logits=True)
    got_labels, got_logits = _run(th_asm, images, 5, np.float16, logits=True)
    for e, g in zip(exp_labels, got_labels):
        np.testing.assert_array_equal(g, e)
    for k in exp_logits:
        np.testing.assert_array_equal(got_logits[k], exp_logits[k])


def test_torch_argmax_ties_go_to_the_first_class_and_nan_to_void():
    np_asm, th_asm = _assemblers(batch_size=1)
    rgb = np.zeros((10, 12, 3), np.uint8)
    for asm in (np_asm, th_asm):
        job = ImageJob(0, rgb, plan_tiles(10, 12, asm.tile_hw))
        (batch,) = asm.batches([job])
        logits = np.zeros((1, 4, *asm.tile_hw), np.float32)
        logits[0, 2:, :, :5] = 1.0  # tie of classes 2 and 3 on the left
        logits[0, 1, 0, 0] = np.nan
        result = logits if asm is np_asm else torch.from_numpy(logits)
        (done,) = asm.add(batch, result, "logits")
        assert done.labels[0, 0] == 255
        assert (done.labels[1:, :5] == 2).all() and (done.labels[0, 1:5] == 2).all()
        assert (done.labels[:, 5:] == 0).all()


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (321, 481), (1, 900)])
def test_torch_tiles_equal_numpy_tiles(hw, pad_mode):
    rgb = np.random.default_rng(3).integers(0, 256, (*hw, 3), dtype=np.uint8)
    np_asm, th_asm = _assemblers(batch_size=5, pad_mode=pad_mode)
    grid = plan_tiles(*hw, TILE_HW)
    expected = np.concatenate([b.tiles for b in np_asm.batches([ImageJob(0, rgb, grid)])])
    got = np.concatenate([b.tiles.numpy() for b in th_asm.batches([ImageJob(0, rgb, grid)])])
    assert got.dtype == np.float32 and got.shape == (grid.count, 3, *TILE_HW)
    np.testing.assert_array_equal(got, expected)


def test_make_assembler_picks_numpy_on_cpu_and_torch_on_cuda():
    kw = dict(tile_hw=TILE_HW, batch_size=2, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert make_assembler(device="cpu", **kw).kind == "numpy"
    assert make_assembler("torch", device="cpu", **kw).kind == "torch"
    with pytest.raises(ValueError, match="numpy assembler needs a CPU"):
        make_assembler("numpy", device="cuda", **kw)


@pytest.mark.gpu
def test_make_assembler_picks_torch_on_cuda():
    asm = make_assembler(device="cuda:0", tile_hw=TILE_HW, batch_size=2, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert asm.kind == "torch" and asm.device.type == "cuda"


def test_segmenter_masks_equal_on_decoded_photos(checkpoint_path, voc_root):
    """The real model on decoded JPEGs: torch assembler (CPU tensors) == numpy assembler."""
    from fcn_deploy.images import load_rgb
    from fcn_deploy.runners.torch_runner import TorchRunner
    from fcn_deploy.infer.segmenter import Segmenter

    photos = sorted((voc_root / "JPEGImages").glob("*.jpg"))[:2]
    assert photos
    rgbs = [load_rgb(p) for p in photos]
    big = np.concatenate([rgbs[0], rgbs[0][:, ::-1]], axis=1)  # wider than a tile: stitched
    with TorchRunner(checkpoint_path) as runner:
        results = {}
        for kind in ("numpy", "torch"):
            with Segmenter(runner, batch_size=2, assembler=kind) as seg:
                assert seg.assembler.kind == kind
                results[kind] = [seg.predict(rgb) for rgb in (*rgbs, big)]
                logits = seg.predict_logits(big)
                results[kind + "-logits"] = logits
    for e, g in zip(results["numpy"], results["torch"]):
        np.testing.assert_array_equal(g, e)
    np.testing.assert_array_equal(results["torch-logits"], results["numpy-logits"])


def _torch_cpu_peak(prof) -> int:
    """Peak bytes held by torch's CPU allocator while profiled by ``prof`` (its alloc/free
    records, in time order)."""
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    assert events, "the profiler recorded no allocation"
    return int(np.max(np.cumsum([b for _, b in events])))


@pytest.mark.slow
def test_torch_assembler_memory_is_bounded_on_8000x8000():
    """Everything torch allocates (traced by its profiler) plus everything numpy allocates
    (tracemalloc) stays within the bound of the assembler's docstring, far below one
    (C, H, W) float32 buffer."""
    H = W = 8000
    C, B = 2, 4
    th, tw = TILE_HW
    rgb = np.full((H, W, 3), 128, np.uint8)
    asm = TorchAssembler(TILE_HW, B, IMAGENET_MEAN, IMAGENET_STD, device="cpu")
    job = ImageJob(0, rgb, plan_tiles(H, W, TILE_HW))

    def run():
        for batch in asm.batches([job]):
            logits = batch.tiles[:, :C] * 2.0  # the "runner": fresh (n, C, th, tw) float32
            asm.add(batch, logits, "logits")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        torch.zeros(1)  # the profiler imports its modules: not in the trace below
    tracemalloc.start()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
            _, numpy_peak = tracemalloc.get_traced_memory()  # before the profiler's own parsing
    finally:
        tracemalloc.stop()
    torch_peak = _torch_cpu_peak(prof)
    assert job.labels is not None and job.labels.shape == (H, W)
    # the docstring's bound, less the uint8 image (on CPU tensors it is the numpy array's memory)
    bound_torch = torch_memory_bound(job.grid, C, B) - 3 * H * W
    assert torch_peak <= bound_torch, (torch_peak, bound_torch)
    # the (H, W) uint8 labels and small objects (the windows are built as numpy arrays too)
    assert numpy_peak <= H * W + (1 << 20), numpy_peak
    assert torch_peak + numpy_peak < C * H * W * 4 / 2  # a (C, H, W) float32 buffer: 512 MB


@pytest.mark.gpu
def test_cuda_assembler_equals_numpy_and_peak_memory_within_bound():
    """On CUDA: the same masks as the numpy path, and the peak allocated device memory of a
    8000x8000 image within the docstring's bound (torch.cuda.max_memory_allocated)."""
    rgb = np.random.default_rng(4).integers(0, 256, (700, 1100, 3), dtype=np.uint8)
    np_asm = NumpyAssembler(TILE_HW, 4, IMAGENET_MEAN, IMAGENET_STD)
    cu_asm = TorchAssembler(TILE_HW, 4, IMAGENET_MEAN, IMAGENET_STD, device="cuda")
    (expected,), _ = _run(np_asm, [rgb], 21)
    jobs = [ImageJob(0, rgb, plan_tiles(*rgb.shape[:2], TILE_HW))]
    done = []
    for batch in cu_asm.batches(jobs):
        logits = _fake_logits(batch.tiles.cpu().numpy(), batch.keys, 21)
        done += cu_asm.add(batch, torch.from_numpy(logits).cuda(), "logits")
    np.testing.assert_array_equal(done[0].labels, expected)

    H = W = 8000
    C, B = 21, 8
    th, tw = TILE_HW
    big = np.full((H, W, 3), 100, np.uint8)
    job = ImageJob(1, big, plan_tiles(H, W, TILE_HW))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for batch in cu_asm.batches([job]):
        logits = batch.tiles[:, :1].expand(-1, C, -1, -1) * 1.0  # the "runner": fresh (n, C, th, tw)
        cu_asm.add(batch, logits, "logits")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    bound = torch_memory_bound(job.grid, C, B)
    assert job.labels.shape == (H, W)
    assert peak <= bound, (peak, bound)


def test_torch_stitcher_keeps_small_images_whole_and_bands_large_ones():
    """Up to WHOLE_IMAGE_BAND_BYTES of class sums the image is finalised once (one argmax and one
    download per photo); beyond, a ring buffer of one tile row bounds the memory."""
    from fcn_deploy.tiling import TorchStitcher

    asm = TorchAssembler(TILE_HW, 4, IMAGENET_MEAN, IMAGENET_STD, device="cpu")
    small = TorchStitcher(asm, plan_tiles(375, 500, TILE_HW), 21)
    assert small.whole and tuple(small.band.shape) == (21, 375, 500) and small.weight is None
    large = TorchStitcher(asm, plan_tiles(3000, 4000, TILE_HW), 21)
    assert not large.whole and tuple(large.band.shape) == (21, TILE_HW[0], 4000)
    assert 21 * 375 * 500 * 4 <= WHOLE_IMAGE_BAND_BYTES < 21 * 3000 * 4000 * 4
