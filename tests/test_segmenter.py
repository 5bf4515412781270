"""The Segmenter (fcn_deploy.infer.segmenter) with small runners that compute for real: a per-pixel
1x1 convolution, whose stitched result must equal the convolution of the whole image (every
tile sees the same value at a pixel, whatever the window), and a "context" model whose logits
also depend on the tile's mean, so that the window and the padding show in the result.
Batching of several images, the labels-or-logits choice, validation, activation ownership,
the stage clock and the CUDA in-flight limit (on a recording fake of torch.cuda's events)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from fcn_deploy.infer import segmenter as segmenter_module
from fcn_deploy.errors import FcnDeployError, InputMismatchError, UsageError
from fcn_deploy.images import normalize
from fcn_deploy.runners.base import Capabilities, Runner, TensorSpec, argmax_labels
from fcn_deploy.infer.segmenter import DEVICE_BATCHES_IN_FLIGHT, Segmenter, runner_device
from fcn_deploy.tiling import ImageJob, make_assembler, plan_tiles
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD, VOC_COLORMAP

TILE = (32, 48)
OVERLAP = 8
CLASSES = 5
MEAN = (0.3, 0.5, 0.6)
STD = (0.2, 0.25, 0.3)
COLOURS = [(0, 0, 0), (200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)]


class PointRunner(Runner):
    """A 1x1 convolution (3 -> 5 classes, fixed random weights) in numpy; records every call."""

    name = "point"

    def __init__(self, tile_hw=TILE, batch=-1, max_batch=None, meta=None, context=0.0, out_hw=None,
                 spec=None, labels_rank=3):
        super().__init__()
        rng = np.random.default_rng(0)
        self.weight = rng.standard_normal((CLASSES, 3)).astype(np.float32)
        self.bias = rng.standard_normal(CLASSES).astype(np.float32)
        self.context = np.float32(context) * rng.standard_normal((CLASSES, 3)).astype(np.float32)
        self._spec = spec if spec is not None else TensorSpec("image", (batch, 3, *tile_hw), "float32")
        self._max_batch = max_batch
        self._meta = {"mean": MEAN, "std": STD, "colormap": COLOURS} if meta is None else meta
        self.out_hw = out_hw
        self.calls: list[tuple[int, str]] = []  # (tiles, output) per infer call
        self.activations = self.deactivations = 0

    def _activate(self):
        self.activations += 1
        self.input_spec, self.max_batch, self.meta = self._spec, self._max_batch, dict(self._meta)

    def _deactivate(self):
        self.deactivations += 1

    def _infer(self, tiles, output):
        self.calls.append((len(tiles), output))
        logits = self.logits(tiles)
        if self.out_hw is not None:
            logits = logits[:, :, : self.out_hw[0], : self.out_hw[1]]
        return argmax_labels(logits) if output == "labels" else logits

    def logits(self, chw: np.ndarray) -> np.ndarray:
        """(N, 3, h, w) -> (N, 5, h, w) float32: the 1x1 convolution plus the context term."""
        out = np.einsum("ck,nkhw->nchw", self.weight, chw) + self.bias[:, None, None]
        if self.context.any():
            out += np.einsum("ck,nk->nc", self.context, chw.mean(axis=(2, 3)))[:, :, None, None]
        return out.astype(np.float32)

    def whole(self, rgb: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
        """The per-pixel model on the whole (H, W, 3) image: (5, H, W) float32 logits."""
        return self.logits(normalize(rgb, mean, std)[None])[0]


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _assert_labels(labels: np.ndarray, logits: np.ndarray) -> None:
    """``labels`` is the argmax of ``logits`` wherever the top two classes are not within rounding."""
    assert labels.dtype == np.uint8 and labels.shape == logits.shape[1:]
    top = np.sort(logits, axis=0)
    clear = top[-1] - top[-2] > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], logits.argmax(0)[clear])


# -- one image --------------------------------------------------------------------------------------
@pytest.mark.parametrize("assembler", ["auto", "numpy", "torch"])
def test_predict_equals_the_per_pixel_model_on_the_whole_image(assembler):
    rgb = _photo(70, 101)
    runner = PointRunner()
    with Segmenter(runner, batch_size=4, overlap=OVERLAP, assembler=assembler) as seg:
        grid = seg.plan(70, 101)
        labels = seg.predict(rgb)
        logits = seg.predict_logits(rgb)
    assert seg.assembler.kind == ("torch" if assembler == "torch" else "numpy")
    assert grid.count > 4 and grid.count % 4  # several batches, the last one short
    whole = runner.whole(rgb)
    _assert_labels(labels, whole)
    assert logits.dtype == np.float32 and logits.shape == (CLASSES, 70, 101)
    np.testing.assert_allclose(logits, whole, rtol=1e-4, atol=1e-4)
    sizes = [n for n, _ in runner.calls]
    assert sizes == 2 * ([4] * (grid.count // 4) + [grid.count % 4])
    assert {o for _, o in runner.calls} == {"logits"}
    assert seg.tiles_run == 2 * grid.count


def test_predict_logits_in_float16_and_the_image_mean_and_std_of_the_model():
    rgb = _photo(50, 60, seed=3)
    runner = PointRunner()
    with Segmenter(runner, batch_size=4, overlap=OVERLAP) as seg:
        half = seg.predict_logits(rgb, dtype=np.float16)
        assert seg.mean == MEAN and seg.std == STD and seg.colormap == COLOURS
    assert half.dtype == np.float16 and half.shape == (CLASSES, 50, 60)
    np.testing.assert_allclose(half, runner.whole(rgb), rtol=2e-3, atol=2e-3)
    imagenet = runner.whole(rgb, IMAGENET_MEAN, IMAGENET_STD)
    assert np.abs(half.astype(np.float32) - imagenet).max() > 0.5  # the model's own mean and std were used


def test_defaults_without_metadata_are_imagenet_and_voc():
    rgb = _photo(40, 40, seed=4)
    runner = PointRunner(meta={})
    with Segmenter(runner, overlap=OVERLAP) as seg:
        logits = seg.predict_logits(rgb)
        assert seg.mean == tuple(IMAGENET_MEAN) and seg.std == tuple(IMAGENET_STD)
        assert seg.colormap == [tuple(c) for c in VOC_COLORMAP] and seg.num_classes == len(VOC_COLORMAP)
    np.testing.assert_allclose(logits, runner.whole(rgb, IMAGENET_MEAN, IMAGENET_STD), rtol=1e-4, atol=1e-4)


def test_num_classes_from_metadata_else_the_colormap():
    with Segmenter(PointRunner(meta={"num_classes": 7, "colormap": COLOURS}), overlap=OVERLAP) as seg:
        assert seg.num_classes == 7 and type(seg.num_classes) is int
    with Segmenter(PointRunner(meta={"num_classes": 0, "colormap": COLOURS}), overlap=OVERLAP) as seg:
        assert seg.num_classes == len(COLOURS)


def test_predict_reads_a_file_like_the_array(tmp_path):
    rgb = _photo(45, 70, seed=5)
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    with Segmenter(PointRunner(), overlap=OVERLAP) as seg:
        np.testing.assert_array_equal(seg.predict(path), seg.predict(rgb))
        np.testing.assert_array_equal(seg.predict(str(path)), seg.predict(rgb))


@pytest.mark.parametrize("image", [
    np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), np.uint8), np.zeros((4, 5, 4), np.uint8),
    np.zeros((0, 5, 3), np.uint8), np.zeros((4, 0, 3), np.uint8), np.zeros((4, 5, 3, 1), np.uint8),
])
def test_bad_image_arrays_are_refused_naming_dtype_and_shape(image):
    runner = PointRunner()
    with Segmenter(runner, overlap=OVERLAP) as seg:
        for call in (seg.predict, seg.predict_logits):
            with pytest.raises(InputMismatchError) as err:
                call(image)
            assert str(err.value) == f"image array is {image.dtype} {image.shape}, expected uint8 (H, W, 3) RGB"
    assert runner.calls == []


def test_single_tile_images_use_the_labels_output_unless_logits_are_wanted():
    rgb = _photo(20, 30, seed=6)  # smaller than one tile: padded
    runner = PointRunner()
    with Segmenter(runner, overlap=OVERLAP) as seg:
        labels = seg.predict(rgb)
        assert runner.calls == [(1, "labels")]
        logits = seg.predict_logits(rgb)
        assert runner.calls[1:] == [(1, "logits")]
    whole = runner.whole(rgb)
    _assert_labels(labels, whole)
    np.testing.assert_allclose(logits, whole, rtol=1e-5, atol=1e-5)


# -- several images -----------------------------------------------------------------------------
@pytest.mark.parametrize("assembler", ["numpy", "torch"])
def test_tiles_of_several_images_share_batches_and_images_finish_in_order(assembler):
    photos = [_photo(70, 101, seed=1), _photo(20, 30, seed=2), _photo(33, 49, seed=3), _photo(20, 25, seed=4)]
    runner = PointRunner()
    with Segmenter(runner, batch_size=4, overlap=OVERLAP, assembler=assembler) as seg:
        grids = [seg.plan(*p.shape[:2]) for p in photos]
        saved: dict[int, np.ndarray] = {}

        def keep(i):
            return lambda c: saved.setdefault(i, np.zeros((c, *photos[i].shape[:2]), np.float32))

        jobs = [ImageJob(i, p, g, logits_out=keep(i)) for i, (p, g) in enumerate(zip(photos, grids))]
        done = list(seg.segment(jobs, want_logits=True))
    total = sum(g.count for g in grids)
    assert [g.count for g in grids][1:] == [1, 4, 1] and total > 8
    assert [j.key for j in done] == [0, 1, 2, 3]
    sizes = [n for n, _ in runner.calls]
    assert sizes == [4] * (total // 4) + ([total % 4] if total % 4 else [])
    assert {o for _, o in runner.calls} == {"logits"}
    assert seg.tiles_run == total
    for job, rgb in zip(done, photos):
        whole = runner.whole(rgb)
        _assert_labels(job.labels, whole)
        np.testing.assert_allclose(saved[job.key], whole, rtol=1e-4, atol=1e-4)


def test_a_batch_of_single_tile_images_gets_labels_a_mixed_batch_logits():
    small = [_photo(20, 30, seed=s) for s in range(3)]
    runner = PointRunner()
    with Segmenter(runner, batch_size=3, overlap=OVERLAP) as seg:
        jobs = [(i, p, seg.plan(*p.shape[:2])) for i, p in enumerate(small)]  # (key, rgb, grid) tuples
        batches = list(seg.iter_batches(jobs))
        assert [[(job.key, index) for job, index in b.keys] for b in batches] == [[(0, 0), (1, 0), (2, 0)]]
        done = list(seg.segment([ImageJob(k, p, g) for k, p, g in jobs]))
        assert runner.calls == [(3, "labels")]
        mixed = [ImageJob("big", _photo(40, 60, seed=9), seg.plan(40, 60))] + [ImageJob(k, p, g) for k, p, g in jobs]
        assert mixed[0].grid.count == 4
        assert [j.key for j in seg.segment(mixed)] == ["big", 0, 1, 2]
    # tiles 0-2 of the big image; its tile 3 and two small images; the last small image alone
    assert runner.calls[1:] == [(3, "logits"), (3, "logits"), (1, "labels")]
    for job, rgb in zip(done, small):
        _assert_labels(job.labels, runner.whole(rgb))


def test_write_tile_normalises_with_the_model_mean_and_std():
    rgb = _photo(40, 60, seed=7)
    with Segmenter(PointRunner(), overlap=OVERLAP) as seg:
        grid = seg.plan(40, 60)
        out = np.empty((3, *TILE), np.float32)
        seg.write_tile(rgb, grid, grid.count - 1, out)
    y, x = grid.origin(grid.count - 1)
    expected = normalize(rgb[y:y + TILE[0], x:x + TILE[1]], MEAN, STD)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_plan_is_the_tile_grid_of_the_runner_tiles():
    with Segmenter(PointRunner(), overlap=OVERLAP) as seg:
        assert seg.plan(70, 101) == plan_tiles(70, 101, TILE, OVERLAP)
        assert seg.tile_hw == TILE


# -- window and padding reach the assembler --------------------------------------------------------
def _by_hand(runner, rgb, window, pad_mode, overlap=OVERLAP):
    asm = make_assembler("numpy", tile_hw=TILE, batch_size=4, mean=MEAN, std=STD, window=window, pad_mode=pad_mode)
    grid = plan_tiles(*rgb.shape[:2], TILE, overlap)
    out = {}
    job = ImageJob(None, rgb, grid, logits_out=lambda c: out.setdefault("x", np.zeros((c, *rgb.shape[:2]), np.float32)))
    for batch in asm.batches([job]):
        asm.add(batch, runner.logits(np.asarray(batch.tiles[: len(batch.keys)])), "logits")
    return out["x"]


@pytest.mark.parametrize("window, pad_mode", [("uniform", "reflect"), ("hann", "constant"), ("hann", "reflect")])
def test_window_and_pad_mode_are_those_asked_for(window, pad_mode):
    rgb = _photo(20, 101, seed=8)  # one tile high (padded), several wide
    runner = PointRunner(context=1.0)
    with Segmenter(runner, batch_size=4, overlap=OVERLAP, window=window, pad_mode=pad_mode) as seg:
        logits = seg.predict_logits(rgb)
    np.testing.assert_allclose(logits, _by_hand(runner, rgb, window, pad_mode), rtol=1e-5, atol=1e-5)
    other_window = "hann" if window == "uniform" else "uniform"
    other_pad = "constant" if pad_mode == "reflect" else "reflect"
    assert np.abs(logits - _by_hand(runner, rgb, other_window, pad_mode)).max() > 1e-3
    assert np.abs(logits - _by_hand(runner, rgb, window, other_pad)).max() > 1e-3


def test_defaults_are_hann_constant_overlap_128_and_8_tiles_per_batch():
    rgb = _photo(300, 290, seed=10)
    tile = (160, 192)
    runner = PointRunner(tile_hw=tile, context=1.0)
    with Segmenter(runner) as seg:
        logits = seg.predict_logits(rgb)
        grid = seg.plan(300, 290)
        assert (seg.batch_size, seg.overlap, seg.window, seg.pad_mode, seg.assembler_kind) == (
            8, 128, "hann", "constant", "auto")
    assert grid == plan_tiles(300, 290, tile, 128) and grid.count > 8
    assert [n for n, _ in runner.calls] == [8] * (grid.count // 8) + [grid.count % 8]
    asm = make_assembler("numpy", tile_hw=tile, batch_size=8, mean=MEAN, std=STD, window="hann", pad_mode="constant")
    out = {}
    job = ImageJob(None, rgb, grid, logits_out=lambda c: out.setdefault("x", np.zeros((c, 300, 290), np.float32)))
    for batch in asm.batches([job]):
        asm.add(batch, runner.logits(np.asarray(batch.tiles[: len(batch.keys)])), "logits")
    np.testing.assert_allclose(logits, out["x"], rtol=1e-5, atol=1e-5)


# -- batch size ------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size, fixed, max_batch, effective, fed", [
    (8, -1, None, 8, 8), (8, 4, None, 4, 4), (8, -1, 5, 5, 5), (3, 4, None, 3, 4), (2, -1, 5, 2, 2), (8, 4, 4, 4, 4),
    (8, 1, None, 1, 1),
])
def test_effective_batch_is_capped_by_the_model(batch_size, fixed, max_batch, effective, fed):
    rgb = _photo(70, 160, seed=11)
    runner = PointRunner(batch=fixed, max_batch=max_batch)
    with Segmenter(runner, batch_size=batch_size, overlap=OVERLAP) as seg:
        assert seg.effective_batch == effective
        labels = seg.predict(rgb)
        count = seg.plan(70, 160).count
    assert count > effective
    assert [n for n, _ in runner.calls][:-1] == [fed] * (len(runner.calls) - 1)
    assert len(runner.calls) == -(-count // effective)
    assert seg.tiles_run == count  # the padding of a fixed batch is not counted
    _assert_labels(labels, runner.whole(rgb))


def test_a_batch_too_large_for_memory_is_refused_unless_the_model_caps_it():
    with pytest.raises(UsageError, match=r"^--batch-size 1000000000: a batch of 32x48 tiles and their 5-class"):
        Segmenter(PointRunner(), batch_size=10**9, overlap=OVERLAP).prepare()
    with pytest.raises(UsageError, match=r"their 50-class"):
        Segmenter(PointRunner(meta={"num_classes": 50}), batch_size=10**9 // 10, overlap=OVERLAP).prepare()
    with Segmenter(PointRunner(batch=4), batch_size=10**9, overlap=OVERLAP) as seg:
        assert seg.effective_batch == 4


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "--batch-size must be >= 1, not 0"),
    (dict(window="gauss"), "--window must be one of uniform, hann, not 'gauss'"),
    (dict(pad_mode="edge"), "pad mode must be one of reflect, constant, not 'edge'"),
    (dict(assembler="cupy"), "assembler must be one of auto, numpy, torch, not 'cupy'"),
    (dict(overlap=-1), "--overlap must be >= 0, not -1"),
])
def test_bad_settings_are_usage_errors(kwargs, message):
    runner = PointRunner()
    with pytest.raises(UsageError) as err:
        Segmenter(runner, **kwargs)
    assert str(err.value) == message
    assert runner.activations == 0


def test_smallest_settings_are_accepted():
    rgb = _photo(40, 100, seed=12)
    runner = PointRunner()
    with Segmenter(runner, batch_size=1, overlap=0) as seg:
        labels = seg.predict(rgb)
        assert seg.plan(40, 100) == plan_tiles(40, 100, TILE, 0)
    assert {n for n, _ in runner.calls} == {1}
    _assert_labels(labels, runner.whole(rgb))
    with Segmenter(PointRunner(), overlap=min(TILE) - 1) as seg:
        assert seg.plan(40, 100).count > 1


def test_overlap_must_be_smaller_than_the_tiles():
    runner = PointRunner()
    seg = Segmenter(runner, overlap=32)
    with pytest.raises(UsageError) as err:
        seg.prepare()
    assert str(err.value) == "--overlap 32 must be smaller than the tile sides 32x48"
    assert not runner.is_active and runner.deactivations == 1  # what it activated is released


@pytest.mark.parametrize("spec, got", [
    (None, "no input spec"),
    (TensorSpec("x", (-1, 1, 32, 48), "float32"), "x float32 (N,1,32,48)"),
    (TensorSpec("x", (-1, 3, 32), "float32"), "x float32 (N,3,32)"),
    (TensorSpec("x", (-1, 3, -1, 48), "float32"), "x float32 (N,3,N,48)"),
    (TensorSpec("x", (-1, 3, 32, -1), "float32"), "x float32 (N,3,32,N)"),
    (TensorSpec("x", (-1, 3, 0, 48), "float32"), "x float32 (N,3,0,48)"),
])
def test_a_model_that_does_not_take_rgb_tiles_is_refused(spec, got):
    runner = PointRunner(spec=spec)
    runner._spec = spec
    seg = Segmenter(runner, overlap=OVERLAP)
    with pytest.raises(InputMismatchError) as err:
        seg.predict(_photo(10, 10))
    assert str(err.value) == f"point: model input is {got}, expected float32 (N,3,H,W) with fixed H and W"
    assert not runner.is_active and runner.deactivations == 1
    assert runner.calls == []


def test_smallest_tiles_are_accepted():
    runner = PointRunner(tile_hw=(1, 2))
    with Segmenter(runner, overlap=0, batch_size=64) as seg:
        labels = seg.predict(_photo(3, 4, seed=13))
    assert seg.tile_hw == (1, 2) and labels.shape == (3, 4)


def test_numpy_assembler_for_a_cuda_runner_is_a_usage_error_naming_the_runner():
    runner = PointRunner()
    runner.device = "cuda:0"
    seg = Segmenter(runner, overlap=OVERLAP, assembler="numpy")
    with pytest.raises(UsageError) as err:
        seg.prepare()
    assert str(err.value) == "point: the numpy assembler needs a CPU runner, not one on cuda:0"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert not runner.is_active


@pytest.mark.parametrize("output, out_hw, expected", [
    ("logits", (16, 48), "(N,C,32,48)"), ("logits", (32, 24), "(N,C,32,48)"), ("labels", (32, 24), "(N,32,48)"),
])
def test_a_wrong_output_shape_is_a_model_mismatch(output, out_hw, expected):
    runner = PointRunner(out_hw=out_hw)
    with Segmenter(runner, overlap=OVERLAP) as seg:
        with pytest.raises(InputMismatchError) as err:
            seg.run_batch(np.zeros((2, 3, *TILE), np.float32), output)
        assert seg.tiles_run == 0
    shape = (2, CLASSES, *out_hw) if output == "logits" else (2, *out_hw)
    assert str(err.value) == (f"point: model returned {output} {shape}, expected {expected}; "
                              "is it a segmentation model for 32x48 tiles?")


class RankRunner(PointRunner):
    """Returns labels where logits were asked for and the other way round."""

    def _infer(self, tiles, output):
        return super()._infer(tiles, "labels" if output == "logits" else "logits")


@pytest.mark.parametrize("output, expected", [("logits", "(N,C,32,48)"), ("labels", "(N,32,48)")])
def test_an_output_of_the_wrong_rank_is_a_model_mismatch(output, expected):
    with Segmenter(RankRunner(), overlap=OVERLAP) as seg:
        with pytest.raises(InputMismatchError) as err:
            seg.run_batch(np.zeros((2, 3, *TILE), np.float32), output)
    assert f"expected {expected};" in str(err.value)


def test_run_batch_on_a_fresh_segmenter_prepares_it():
    """run_batch first (the other building blocks prepare too) activates and reads the runner,
    instead of failing on a tile size it has not read."""
    tiles = np.random.default_rng(20).standard_normal((2, 3, *TILE)).astype(np.float32)
    runner = PointRunner()
    seg = Segmenter(runner, overlap=OVERLAP)
    np.testing.assert_array_equal(seg.run_batch(tiles, "labels"), runner.logits(tiles).argmax(1))
    assert runner.is_active and seg.tiles_run == 2
    seg.close()
    assert not runner.is_active
    bridged = Segmenter(NumpyOnly(), overlap=OVERLAP, assembler="torch")
    out = bridged.run_batch(torch.from_numpy(tiles), "logits")
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), runner.logits(tiles), rtol=1e-6)
    bridged.close()


def test_run_batch_counts_the_tiles_that_belong_to_images():
    tiles = np.random.default_rng(14).standard_normal((3, 3, *TILE)).astype(np.float32)
    runner = PointRunner()
    with Segmenter(runner, overlap=OVERLAP) as seg:
        logits = seg.run_batch(tiles, "logits")
        labels = seg.run_batch(tiles, "labels", count=2)
        assert seg.tiles_run == 5
    np.testing.assert_allclose(logits, runner.logits(tiles), rtol=1e-6)
    np.testing.assert_array_equal(labels, runner.logits(tiles).argmax(1))


# -- activation ------------------------------------------------------------------------------------
class CountingRunner(PointRunner):
    """Counts deactivate() calls (the base one is a no-op on an inactive runner)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.deactivate_calls = 0

    def deactivate(self):
        self.deactivate_calls += 1
        super().deactivate()


def test_the_segmenter_deactivates_only_what_it_activated():
    runner = CountingRunner()
    seg = Segmenter(runner, overlap=OVERLAP)
    assert not runner.is_active  # nothing happens before use
    with seg as same:
        assert same is seg and runner.is_active and runner.activations == 1
        seg.prepare()  # idempotent
        seg.predict(_photo(20, 20))
        assert runner.activations == 1
    assert not runner.is_active and runner.deactivate_calls == 1
    runner.activate()  # now the caller's
    seg.close()
    assert runner.is_active and runner.deactivate_calls == 1
    with Segmenter(runner, overlap=OVERLAP) as other:
        other.predict(_photo(20, 20))
    assert runner.is_active and runner.activations == 2 and runner.deactivate_calls == 1
    runner.deactivate()


def test_first_use_activates_and_a_runner_deactivated_behind_its_back_is_reactivated():
    runner = PointRunner()
    seg = Segmenter(runner, overlap=OVERLAP)
    rgb = _photo(20, 20, seed=15)
    first = seg.predict(rgb)  # prepares on first use
    assert runner.is_active and runner.activations == 1
    runner.deactivate()
    np.testing.assert_array_equal(seg.predict(rgb), first)
    assert runner.is_active and runner.activations == 2
    seg.close()
    assert not runner.is_active


def test_a_runner_active_before_reads_its_spec_without_reactivation():
    runner = PointRunner().activate()
    with Segmenter(runner, overlap=OVERLAP) as seg:
        assert seg.tile_hw == TILE
        seg.predict(_photo(20, 20))
    assert runner.is_active and runner.activations == 1 and runner.deactivations == 0


def test_a_closed_segmenter_reads_a_reactivated_runner_again():
    """The caller's runner, re-activated on another artifact (here: other tiles), is read anew."""
    runner = PointRunner().activate()
    seg = Segmenter(runner, overlap=OVERLAP)
    seg.prepare()
    assert seg.tile_hw == TILE
    seg.close()
    assert runner.is_active  # the caller's
    runner.deactivate()
    runner._spec = TensorSpec("image", (-1, 3, 16, 24), "float32")
    runner.activate()
    rgb = _photo(40, 60, seed=18)
    labels = seg.predict(rgb)
    assert seg.tile_hw == (16, 24) and seg.plan(40, 60) == plan_tiles(40, 60, (16, 24), OVERLAP)
    _assert_labels(labels, runner.whole(rgb))


def test_planning_while_tiles_are_in_flight_keeps_one_assembler():
    """A lazy job stream that plans each image as the assembler asks for it (as a pipeline
    does) goes through one assembler: preparing again is a no-op."""
    photos = [_photo(70, 101, seed=s) for s in range(3)]
    runner = PointRunner()
    with Segmenter(runner, batch_size=4, overlap=OVERLAP) as seg:
        asm = seg.assembler
        seg.prepare()
        assert seg.assembler is asm
        jobs = (ImageJob(i, p, seg.plan(*p.shape[:2])) for i, p in enumerate(photos))
        done = list(seg.segment(jobs))
        assert seg.assembler is asm
    assert [j.key for j in done] == [0, 1, 2]
    for job, rgb in zip(done, photos):
        _assert_labels(job.labels, runner.whole(rgb))


def test_zero_tiles_that_keep_the_batch_shape_are_not_counted():
    photos = [_photo(20, 30, seed=1), _photo(40, 60, seed=2), _photo(20, 25, seed=3)]  # 1, 4 and 1 tiles
    runner = PointRunner()
    with Segmenter(runner, batch_size=4, overlap=OVERLAP, assembler="torch") as seg:
        seg.assembler.keep_batch_shape = True  # what a CUDA assembler does (zero tiles after the real ones)
        got = [seg.predict(p) for p in photos]
        assert seg.tiles_run == 1 + 4 + 1
    assert [n for n, _ in runner.calls] == [4, 4, 4]
    for labels, rgb in zip(got, photos):
        _assert_labels(labels, runner.whole(rgb))


def test_activation_errors_propagate_typed():
    runner = PointRunner()
    runner._activate = lambda: (_ for _ in ()).throw(FcnDeployError("point: model file is gone"))
    seg = Segmenter(runner, overlap=OVERLAP)
    with pytest.raises(FcnDeployError, match="model file is gone"):
        seg.predict(_photo(10, 10))
    assert not runner.is_active


# -- runner device, bridge, clock -----------------------------------------------------------------
class NumpyOnly(PointRunner):
    """A runner that declares it takes numpy only (no tensor path at all)."""

    capabilities = Capabilities(tensors=False)
    _infer_tensor = None


def test_runner_device():
    tensors = PointRunner()
    assert runner_device(tensors) == "cpu"
    tensors.device = "cuda:1"
    assert runner_device(tensors) == "cuda:1"
    tensors.device = None
    assert runner_device(tensors) == "cpu"
    numpy_only = NumpyOnly()
    numpy_only.device = "cuda:1"
    assert runner_device(numpy_only) == "cpu"
    # declared, never probed: an object without capabilities is fed numpy, whatever it has
    assert runner_device(types.SimpleNamespace(device="cuda", _infer_tensor=lambda t, o: t)) == "cpu"
    assert runner_device(types.SimpleNamespace(capabilities=Capabilities())) == "cpu"  # no device: the CPU
    assert runner_device(types.SimpleNamespace(device="cuda", capabilities=Capabilities())) == "cuda"


class Wrapped:
    """A runner by duck typing (no Runner subclass) that declares no capabilities."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name in ("_infer_tensor", "capabilities"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_a_duck_typed_runner_without_a_tensor_path():
    inner = PointRunner()
    inner.device = "cuda:0"
    runner = Wrapped(inner)
    assert runner_device(runner) == "cpu"
    rgb = _photo(70, 101, seed=19)
    for kind in ("auto", "torch"):
        with Segmenter(runner, batch_size=4, overlap=OVERLAP, assembler=kind) as seg:
            assert seg._bridge is (kind == "torch")
            _assert_labels(seg.predict(rgb), inner.whole(rgb))
    assert not inner.is_active


def test_a_numpy_only_runner_behind_the_torch_assembler_gets_numpy():
    rgb = _photo(70, 101, seed=16)

    class Strict(NumpyOnly):
        def _infer(self, tiles, output):
            assert isinstance(tiles, np.ndarray)
            return super()._infer(tiles, output)

    runner = Strict()
    with Segmenter(runner, batch_size=3, overlap=OVERLAP, assembler="torch") as seg:
        assert seg.assembler.kind == "torch"
        labels = seg.predict(rgb)
        small = seg.predict(_photo(20, 30, seed=17))
        tiles = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, *TILE)).astype(np.float32))
        out = seg.run_batch(tiles, "logits")
        array = seg.run_batch(tiles.numpy(), "logits")
    assert isinstance(out, torch.Tensor) and isinstance(array, np.ndarray)
    np.testing.assert_array_equal(out.numpy(), array)
    _assert_labels(labels, runner.whole(rgb))
    assert small.shape == (20, 30)
    with Segmenter(PointRunner(), batch_size=3, overlap=OVERLAP, assembler="torch") as seg:
        assert not seg._bridge
    with Segmenter(Strict(), batch_size=3, overlap=OVERLAP, assembler="numpy") as seg:
        assert not seg._bridge


def test_engine_and_stitch_time_go_to_the_shared_clock(monkeypatch):
    ticks = iter(range(1000))
    monkeypatch.setattr(segmenter_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    runner = PointRunner()
    with Segmenter(runner, batch_size=3, overlap=OVERLAP) as seg:
        assert seg.assembler.clock is seg.clock
        seg.predict(_photo(70, 101))
        batches = len(runner.calls)
    assert seg.clock.seconds["engine"] == batches and seg.clock.seconds["stitch"] == batches


# -- the CUDA in-flight limit, on a recording fake of torch.cuda's events ----------------------------
class _Event:
    def __init__(self, log):
        self.log, self.id = log, len([e for e in log if e[0] == "record"])

    def record(self, stream):
        self.log.append(("record", self.id, stream))

    def synchronize(self):
        self.log.append(("sync", self.id))


def test_at_most_three_batches_are_queued_on_the_device(monkeypatch):
    log: list = []
    monkeypatch.setattr(torch.cuda, "Event", lambda: _Event(log))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    seg = Segmenter(PointRunner(), overlap=OVERLAP)
    assert DEVICE_BATCHES_IN_FLIGHT == 3
    for _ in range(5):
        seg._pace("cuda:0")
    assert log == [("record", 0, "stream of cuda:0"), ("record", 1, "stream of cuda:0"),
                   ("record", 2, "stream of cuda:0"), ("record", 3, "stream of cuda:0"), ("sync", 0),
                   ("record", 4, "stream of cuda:0"), ("sync", 1)]
    assert len(seg._in_flight) == 3


class _DeviceResult(np.ndarray):
    """Host logits that say they live on a CUDA device (what a CUDA runner returns)."""

    is_cuda = True
    device = "cuda:0"


def test_run_batch_paces_results_on_a_cuda_device_only(monkeypatch):
    paced: list = []
    seg = Segmenter(PointRunner(), overlap=OVERLAP)
    seg.prepare()
    monkeypatch.setattr(seg, "_pace", paced.append)
    tiles = np.zeros((2, 3, *TILE), np.float32)
    seg.run_batch(tiles, "logits")
    seg.run_batch(torch.from_numpy(tiles), "logits")
    assert paced == []
    seg.runner.infer = lambda t, output: seg.runner.logits(t).view(_DeviceResult)
    seg.run_batch(tiles, "logits")
    assert paced == ["cuda:0"]
