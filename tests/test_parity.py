"""`fcn-deploy check`: parity metrics on hand-made arrays, thresholds, and the whole check on the
random-weight fixtures (ort passes, a perturbed ONNX fails, stale/missing artifacts skip)."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from fcn_deploy.errors import UsageError, VerificationError
from fcn_deploy.parity.check import check, parse_backends
from fcn_deploy.parity.metrics import ParityAccumulator, histogram_quantile
from fcn_deploy.parity.thresholds import DEFAULT_THRESHOLDS, apply_thresholds, parse_thresholds, raise_on_failures


# -- pure metrics ----------------------------------------------------------------------------
def _one_hot(labels: np.ndarray, c: int = 3, value: float = 2.0) -> np.ndarray:
    """(N, H, W) class ids -> (N, C, H, W) float32 logits with ``value`` at the class."""
    out = np.zeros((labels.shape[0], c, *labels.shape[1:]), dtype=np.float32)
    for k in range(c):
        out[:, k][labels == k] = value
    return out


REF_LABELS = np.array([[[0, 1], [2, 0]], [[1, 1], [0, 2]]], dtype=np.uint8)


@pytest.fixture()
def hand_made():
    """Two 2x2 tiles, 3 classes: tile 0 pixel (1,1) flips 0 -> 2 (diff 3), tile 1 gets a
    0.5 diff that keeps the argmax."""
    ref = _one_hot(REF_LABELS)
    out = ref.copy()
    out[0, 2, 1, 1] = 3.0
    out[1, 0, 0, 0] = 0.5
    return ref, out


def test_logit_metrics_exact(hand_made):
    ref, out = hand_made
    acc = ParityAccumulator(3)
    acc.update(ref[:1], out[:1])  # two batches: streaming must equal one pass
    acc.update(ref[1:], out[1:].astype(np.float16))
    res = acc.result()
    assert res["tiles"] == 2 and res["pixels"] == 8
    assert res["max_abs"] == 3.0
    assert res["mean_abs"] == pytest.approx(3.5 / 24, rel=1e-12)
    assert res["p99_abs"] == 3.0  # rank ceil(0.99*24) = 24: the maximum, capped exactly
    # tile 0: r.r = 16, o.o = 25, r.o = 16; tile 1: o.o = 16.25
    cos1 = 16 / math.sqrt(16 * 16.25)
    assert res["cosine_min"] == pytest.approx(0.8, abs=1e-12)
    assert res["cosine_mean"] == pytest.approx((0.8 + cos1) / 2, abs=1e-12)
    assert res["agreement"] == pytest.approx(100 * 7 / 8)
    # reference as target: IoU0 = 2/3, IoU1 = 1, IoU2 = 2/3
    assert res["miou_vs_reference"] == pytest.approx(100 * 7 / 9)
    assert res["miou_gt_reference"] is None and res["miou_gt_change"] is None
    assert acc.tile_agreement == [75.0, 100.0]


def test_ground_truth_miou_and_change(hand_made):
    ref, out = hand_made
    gt = np.array([[[0, 1], [255, 0]], [[1, 0], [0, 2]]], dtype=np.uint8)
    acc = ParityAccumulator(3)
    acc.update(ref, out, labels=gt)
    res = acc.result()
    # reference: IoU = 3/4, 2/3, 1 -> 29/36; backend: IoU = 1/2, 2/3, 1/2 -> 5/9
    assert res["miou_gt_reference"] == pytest.approx(100 * 29 / 36)
    assert res["miou_gt_backend"] == pytest.approx(100 * 5 / 9)
    assert res["miou_gt_change"] == pytest.approx(-25.0)


def test_valid_mask_excludes_padding(hand_made):
    ref, out = hand_made
    valid = np.ones((2, 2, 2), dtype=bool)
    valid[0, 1, 1] = False  # the flipped pixel is padding
    acc = ParityAccumulator(3)
    acc.update(ref, out, valid=valid)
    res = acc.result()
    assert res["pixels"] == 7 and res["agreement"] == 100.0
    assert res["max_abs"] == 0.5
    assert res["mean_abs"] == pytest.approx(0.5 / 21)
    assert acc.worst_tiles() == []


def test_worst_tiles_keep_lowest_agreement():
    rng = np.random.default_rng(0)
    ref_labels = rng.integers(0, 3, size=(6, 4, 4)).astype(np.uint8)
    out_labels = ref_labels.copy()
    flips = [3, 0, 5, 1, 0, 2]  # pixels flipped per tile
    for i, k in enumerate(flips):
        out_labels[i].flat[:k] = (out_labels[i].flat[:k] + 1) % 3
    acc = ParityAccumulator(3, keep_worst=2)
    for i in range(0, 6, 4):
        acc.update(_one_hot(ref_labels[i:i + 4]), _one_hot(out_labels[i:i + 4]))
    worst = acc.worst_tiles()
    assert [w.index for w in worst] == [2, 0]
    assert worst[0].agreement == pytest.approx(100 * 11 / 16)
    assert worst[0].mask.sum() == 5 and worst[0].mask.shape == (4, 4)


def test_p99_within_one_bin():
    ref = np.zeros((1, 10, 10, 10), dtype=np.float32)
    out = np.arange(1, 1001, dtype=np.float32).reshape(ref.shape) * 1e-4
    acc = ParityAccumulator(10)
    acc.update(ref, out)
    exact = float(np.float32(990e-4))  # the 990th smallest of 1000
    p99 = acc.result()["p99_abs"]
    assert exact <= p99 <= exact * 1.0091
    assert math.isnan(histogram_quantile(np.zeros(4, dtype=np.int64), 0.99, 1.0))


def test_shape_mismatch_is_usage_error():
    acc = ParityAccumulator(3)
    with pytest.raises(UsageError, match="do not match"):
        acc.update(np.zeros((1, 3, 2, 2), np.float32), np.zeros((1, 3, 2, 4), np.float32))


# -- thresholds ------------------------------------------------------------------------------
def test_parse_thresholds_overrides_and_errors():
    limits = parse_thresholds(["fp32.max_abs=2e-3", "fp16.miou_gt_change=off", "FP16.agreement=98"])
    assert limits["fp32"] == {"agreement": 99.99, "max_abs": 2e-3}
    assert limits["fp16"] == {"agreement": 98.0}
    assert DEFAULT_THRESHOLDS["fp32"]["max_abs"] == 1e-3  # defaults untouched
    for bad, why in [("fp32.max_abs", "PRECISION.METRIC=VALUE"), ("fp32.speed=1", "unknown metric"),
                     ("fp32.max_abs=abc", "not a number"), ("max_abs=1", "PRECISION.METRIC"),
                     ("fp32.nonfinite=5", "unknown metric")]:  # non-finite logits always fail
        with pytest.raises(UsageError, match=why):
            parse_thresholds([bad])


@pytest.mark.parametrize("bad, why", [
    # issue 10, defect 4: each of these weakened the gate silently
    ("fp16.agreement=0.999", r"agreement is a percentage \(0-100\], e.g. agreement=99.9; 0.999 looks like a fraction"),
    ("fp32.miou_vs_reference=0.5", "is a percentage"),
    ("f16.agreement=99.9", "unknown precision 'f16'; choose from fp32, fp16"),
    ("fp32.agreement=150", "cannot exceed 100"),
    ("fp32.max_abs=-1", "cannot be negative"),
    ("fp16.miou_gt_change=-0.5", "cannot be negative"),
    ("fp32.cosine_min=1.5", r"similarity in \[0, 1\]"),
])
def test_threshold_that_would_weaken_the_gate_is_refused(bad, why):
    with pytest.raises(UsageError, match=why) as err:
        parse_thresholds([bad])
    assert "\n" not in str(err.value) and repr(bad) in str(err.value)


def test_non_finite_logits_fail_the_check():
    """Issue 10, defect 5: NaN logits passed max_abs (max(0.0, nan) is 0.0, NaN in the first bin)."""
    ref = _one_hot(REF_LABELS)
    out = ref.copy()
    out[0, 1, 0, 0] = np.nan
    out[1, 2, 1, 1] = np.inf
    acc = ParityAccumulator(3)
    acc.update(ref, out)
    m = acc.result()
    assert m["nonfinite"] == 2 and m["max_abs"] == 0.0  # the finite values match exactly
    outcomes = apply_thresholds("ort", "fp32", m, parse_thresholds(["fp32.agreement=off"]))
    assert [(o.metric, o.passed) for o in outcomes] == [("nonfinite", False), ("max_abs", True)]
    assert outcomes[0].message == "ort: non-finite (NaN/inf) logits 2 > 0 (over by 2)"
    with pytest.raises(VerificationError, match="non-finite"):
        raise_on_failures({"ort": outcomes})
    clean = ParityAccumulator(3)
    clean.update(ref, ref.copy())
    assert all(o.passed for o in apply_thresholds("ort", "fp32", clean.result(), parse_thresholds(None)))


def test_failure_messages_name_metric_and_gap():
    limits = parse_thresholds(None)
    fp16 = apply_thresholds("ort-fp16", "fp16", {"agreement": 98.7, "miou_gt_change": None}, limits)
    assert [o.passed for o in fp16] == [True, False, True]  # nonfinite (absent: not checked) first
    fp16 = fp16[1:]
    assert fp16[0].message == "ort-fp16: argmax agreement 98.70% < 99.50% (short by 0.80 points)"
    fp32 = apply_thresholds("ort", "fp32", {"agreement": 99.985, "max_abs": 2.13e-3}, limits)[1:]
    assert fp32[0].message == "ort: argmax agreement 99.985% < 99.990% (short by 0.005 points)"
    assert fp32[1].message == "ort: max abs logit difference 2.13e-03 > 1.00e-03 (over by 1.13e-03)"
    drop = apply_thresholds("trt", "fp16", {"agreement": 99.9, "miou_gt_change": -0.8}, limits)[1:]
    assert drop[1].message == (
        "trt: mIoU change vs ground truth 0.80 points > 0.50 points (over by 0.30 points)")
    with pytest.raises(VerificationError, match="short by 0.80 points.*over by 1.13e-03"):
        raise_on_failures({"ort-fp16": fp16, "ort": fp32})
    raise_on_failures({"ok": apply_thresholds("ok", "fp32", {"agreement": 100.0, "max_abs": 0.0}, limits)})
    with pytest.raises(UsageError, match="no thresholds for precision 'bf16'"):
        apply_thresholds("x", "bf16", {}, limits)


def test_parse_backends():
    assert parse_backends(("ort,trt", "ort")) == (["ort", "trt"], False)
    assert parse_backends("all") == (["ort", "ort-fp16", "ort-int8", "ort-int8-cpu", "trt"], True)
    with pytest.raises(UsageError, match="--backend must be one of .* not 'torch'"):
        parse_backends(["torch"])


# -- the whole check on the fixtures ---------------------------------------------------------
def _check(backends, checkpoint_path, export_dir, voc_root, tmp_path, **kw):
    kw.setdefault("max_tiles", 2)
    return check(backends, model=checkpoint_path, export_dir=export_dir, engines_dir=tmp_path / "engines",
                 voc_root=voc_root, **kw)


@pytest.fixture(scope="module")
def perturbed_export(tmp_path_factory, onnx_path, fp16_onnx_path):
    """An export folder whose fcn.onnx has its first Conv weights scaled by 1.05 (metadata, and so
    its parent checkpoint sha256, kept) and whose fcn.fp16.onnx is the fixture's, now stale."""
    import onnx

    folder = tmp_path_factory.mktemp("perturbed")
    model = onnx.load(onnx_path)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(t for t in model.graph.initializer if t.name == conv.input[1])
    weight = onnx.numpy_helper.to_array(init) * np.float32(1.05)
    init.CopyFrom(onnx.numpy_helper.from_array(weight, init.name))
    onnx.save(model, folder / "fcn.onnx")
    shutil.copy(fp16_onnx_path, folder / "fcn.fp16.onnx")
    return folder


def test_matching_backends_pass(checkpoint_path, onnx_path, fp16_onnx_path, voc_root, tmp_path):
    report = tmp_path / "parity.json"
    result = _check(["ort", "ort-fp16"], checkpoint_path, onnx_path.parent, voc_root, tmp_path,
                    max_tiles=3, report=report)
    assert result.passed
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["reference"]["precision"] == "fp32"
    assert data["source"]["kind"] == "voc" and data["source"]["labels"] is True
    assert data["source"]["tiles"] == 3 and data["source"]["tile_hw"] == [320, 480]
    ort, fp16 = data["backends"]
    assert (ort["backend"], ort["precision"], ort["status"]) == ("ort", "fp32", "pass")
    assert (fp16["backend"], fp16["precision"], fp16["status"]) == ("ort-fp16", "fp16", "pass")
    m = ort["metrics"]
    assert m["max_abs"] <= 1e-3 and m["agreement"] >= 99.99 and m["cosine_min"] > 0.999999
    assert m["mean_abs"] <= m["p99_abs"] <= m["max_abs"] * 1.0091
    assert {c["metric"] for c in ort["checks"]} == {"nonfinite", "agreement", "max_abs"}
    f = fp16["metrics"]
    assert f["agreement"] >= 99.5 and f["max_abs"] > m["max_abs"]
    assert f["miou_gt_reference"] == pytest.approx(m["miou_gt_reference"])  # same reference
    assert f["miou_gt_change"] == pytest.approx(f["miou_gt_backend"] - f["miou_gt_reference"])
    assert {c["metric"] for c in fp16["checks"]} == {"nonfinite", "agreement", "miou_gt_change"}
    print("\nort-fp16 vs torch fp32 (random weights, 3 VOC tiles):",
          {k: f[k] for k in ("max_abs", "mean_abs", "p99_abs", "cosine_min", "agreement", "miou_vs_reference",
                             "miou_gt_change")})
    for entry in fp16["disagreement_maps"]:  # FP16 flips a few pixels: maps beside the report
        assert entry["path"].startswith(str(tmp_path / "parity-disagreement"))


def test_perturbed_onnx_fails_naming_metric(checkpoint_path, perturbed_export, voc_root, tmp_path):
    from PIL import Image

    report = tmp_path / "r.json"
    messages: list[str] = []
    with pytest.raises(VerificationError, match=r"ort: max abs logit difference \S+ > 1.00e-03 \(over by"):
        _check(["ort", "ort-fp16"], checkpoint_path, perturbed_export, voc_root, tmp_path, report=report,
               disagreement_dir=tmp_path / "maps", echo=messages.append)
    assert messages[-1] == f"disagreement maps of the worst tiles (ort: 2) written to {tmp_path / 'maps'}{os.sep}"
    data = json.loads(report.read_text())  # written before the failure is raised
    ort, fp16 = data["backends"]
    assert data["passed"] is False and ort["status"] == "fail"
    assert not next(c for c in ort["checks"] if c["metric"] == "max_abs")["passed"]
    assert fp16["status"] == "skipped" and "fcn.fp16.onnx is stale" in fp16["reason"]
    assert ort["disagreement_maps"], "a perturbed model disagrees somewhere"
    for entry in ort["disagreement_maps"]:
        img = np.asarray(Image.open(entry["path"]))
        assert img.shape[0] > 320 and img.shape[1:] == (480, 3)  # the tile, a caption below it
        magenta = np.all(img[:320] == (255, 0, 255), axis=-1).sum()
        assert magenta == entry["pixels_disagreeing"] > 0
        caption = img[320:]
        assert (caption.max(axis=-1) < 100).sum() > 200  # its text (the pixel count)
        assert np.all(caption == (255, 0, 255), axis=-1).sum() >= 25  # the swatch of the colour it explains


def test_cli_check_exit_codes(checkpoint_path, perturbed_export, voc_root, tmp_path):
    from click.testing import CliRunner

    from fcn_deploy.cli import cli

    base = ["check", "--backend", "ort", "--model", str(checkpoint_path), "--voc-root", str(voc_root),
            "--max-tiles", "1", "--engines-dir", str(tmp_path / "e"), "--disagreement-dir", str(tmp_path / "m")]
    failed = CliRunner().invoke(cli, base + ["--export-dir", str(perturbed_export)])
    assert failed.exit_code == 1, failed.output
    assert "error: parity check failed: ort:" in failed.output
    assert "ort: max abs logit difference" in failed.output
    assert "FAIL" in failed.output  # the table came first
    loose = CliRunner().invoke(cli, base + ["--export-dir", str(perturbed_export), "--threshold", "fp32.max_abs=off",
                                            "--threshold", "fp32.agreement=off"])
    assert loose.exit_code == 0, loose.output
    assert "PASS" in loose.output
    missing = CliRunner().invoke(cli, base + ["--export-dir", str(tmp_path / "nothing")])
    assert missing.exit_code == 2
    assert "error: nothing to check: ort:" in missing.output and "fcn.onnx not found" in missing.output


def test_stale_and_missing_artifacts(checkpoint_path, onnx_path, fp16_onnx_path, voc_root, tmp_path):
    import torch

    from fcn_deploy.errors import ArtifactNotFoundError
    from fcn_deploy.model import FCN, save_checkpoint

    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_checkpoint(other, FCN().eval())
    with pytest.raises(ArtifactNotFoundError, match=r"nothing to check: ort: .*fcn.onnx is stale"):
        _check(["ort", "ort-fp16"], other, onnx_path.parent, voc_root, tmp_path)
    with pytest.raises(VerificationError, match=r"--strict: backends not checked: ort: .*stale"):
        _check(["all"], other, onnx_path.parent, voc_root, tmp_path, strict=True)
    # ort checked, trt (no engine) skipped: fine, but an error under --strict when asked for by name
    result = _check(["ort", "trt"], checkpoint_path, onnx_path.parent, voc_root, tmp_path, max_tiles=1)
    assert [b.status for b in result.backends] == ["pass", "skipped"]
    assert result.backends[1].reason and "trt: skipped:" in result.table()
    with pytest.raises(VerificationError, match="--strict: backends not checked: trt:"):
        _check(["ort", "trt"], checkpoint_path, onnx_path.parent, voc_root, tmp_path, strict=True)


def test_photo_folder_source_pads_and_skips_unreadable(checkpoint_path, onnx_path, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (320, 480, 3), dtype=np.uint8)).save(photos / "big.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)).save(photos / "small.png")
    messages = []
    result = check(["ort"], model=checkpoint_path, export_dir=onnx_path.parent, engines_dir=tmp_path / "e",
                   images=photos, max_tiles=3, echo=messages.append, disagreement_dir=tmp_path / "maps")
    assert any("warning: skipping" in m and "broken.jpg" in m for m in messages)
    assert result.source["kind"] == "images" and result.source["labels"] is False
    assert result.source["tiles"] == 2 and result.source["images_used"] == 2
    metrics = result.backends[0].metrics
    assert metrics["pixels"] == 320 * 480 + 100 * 150  # the small photo's padding is left out
    assert metrics["miou_gt_change"] is None and result.passed
    with pytest.raises(UsageError, match="give one tile source, not --images and --synthetic"):
        check(["ort"], model=checkpoint_path, export_dir=onnx_path.parent, images=photos, synthetic=2)


def test_caption_below_keeps_the_picture_and_wraps_its_text():
    from fcn_deploy.report import with_caption

    rgb = np.full((20, 120, 3), 200, np.uint8)
    one = with_caption(rgb, ["12 pixels"])
    two = with_caption(rgb, ["12 of 2,400 pixels (0.50%) disagree: ort-fp16 vs PyTorch fp32"])  # wraps at 120 px
    assert np.array_equal(one[:20], rgb) and one.shape[1] == 120 and one.shape[0] > 20
    assert two.shape[0] > one.shape[0] and (two[20:].max(axis=-1) < 100).any()


def test_disagreement_map_marks_pixels_and_a_visible_halo():
    from fcn_deploy.report import DISAGREE_COLOR, disagreement_map

    rgb = np.full((20, 30, 3), 200, np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[10, 15] = True
    out = disagreement_map(rgb, mask, dim=0.5, halo=2)
    assert tuple(out[10, 15]) == DISAGREE_COLOR
    assert tuple(out[12, 17]) != (100, 100, 100) and out[12, 17, 0] > out[12, 17, 1]  # halo: reddened
    assert tuple(out[10, 18]) == (100, 100, 100) and tuple(out[0, 0]) == (100, 100, 100)  # dimmed only
    assert np.array_equal(disagreement_map(rgb, np.zeros_like(mask), dim=0.5), np.full_like(rgb, 100))


def test_fixed_batch_onnx_is_checked_with_padded_batches(checkpoint_path, onnx_path, voc_root, tmp_path):
    """An ONNX exported with a fixed batch of 2 gets batches of 2 and a padded last batch of 1."""
    import onnx

    model = onnx.load(onnx_path)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    folder = tmp_path / "fixed"
    folder.mkdir()
    onnx.save(model, folder / "fcn.onnx")
    result = _check(["ort"], checkpoint_path, folder, voc_root, tmp_path, max_tiles=3, batch_size=4)
    (entry,) = result.checked
    assert result.passed and entry.metrics["tiles"] == 3


@pytest.mark.parametrize("location, why", [("w.data", "not regular file"), ("../../etc/passwd", "points outside")])
def test_check_onnx_with_missing_or_escaping_external_data_is_one_line(checkpoint_path, tmp_path, location, why,
                                                                        external_data_onnx):
    """Issue 10, defect 10: check showed an onnx ValidationError traceback."""
    from click.testing import CliRunner

    from fcn_deploy.cli import cli

    export = tmp_path / "export"
    external_data_onnx(export, location)
    res = CliRunner().invoke(cli, ["check", "--backend", "ort", "--model", str(checkpoint_path),
                                   "--export-dir", str(export), "--synthetic", "2",
                                   "--disagreement-dir", str(tmp_path / "maps")])  # never ./check
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    assert "Traceback" not in res.output
    line = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "fcn.onnx is not a readable ONNX model" in line[0] and why in line[0]


def test_check_report_path_checked_before_the_work(checkpoint_path, onnx_path, tmp_path, monkeypatch):
    """Issue 10, defect 6: an unwritable --report was found only after every backend had run."""
    import fcn_deploy.parity.check as check_mod
    from fcn_deploy.errors import FcnDeployError

    def no_work(*args, **kwargs):
        raise AssertionError("the check started before its --report path was checked")

    monkeypatch.setattr(check_mod, "tile_source", no_work)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(FcnDeployError, match=r"--report .*afile/r.json: cannot create a folder there, .*afile is a file"):
        check(["ort"], model=checkpoint_path, export_dir=onnx_path.parent, report=blocker / "r.json")


def test_default_map_folder_only_for_a_failure_and_its_place_is_printed(checkpoint_path, perturbed_export,
                                                                        voc_root, tmp_path, monkeypatch):
    """issue 24: check wrote disagreement maps to ./check/ when every backend passed, and never said so."""
    monkeypatch.chdir(tmp_path)
    messages: list[str] = []
    loose = ["fp32.max_abs=off", "fp32.agreement=off", "fp32.miou_gt_change=off"]
    result = _check(["ort"], checkpoint_path, perturbed_export, voc_root, tmp_path, max_tiles=1, thresholds=loose,
                    echo=messages.append)
    assert result.passed and not (tmp_path / "check").exists()
    assert not any("disagreement maps" in m for m in messages) and not result.checked[0].maps
    # a failing backend's maps, and where they went: test_perturbed_onnx_fails_naming_metric


def test_check_with_a_state_dict_as_model_says_what_it_is(onnx_path, checkpoint_path, tmp_path):
    """issue 24: check --model resnet18_statedict.pt called export/fcn.onnx stale "made from" that file
    and suggested an export --force that then failed."""
    import torch

    from fcn_deploy.errors import CheckpointError

    resnet = tmp_path / "resnet18_statedict.pt"
    torch.save({"conv1.weight": torch.zeros(1), "layer4.1.conv2.weight": torch.zeros(1), "fc.weight": torch.zeros(1)},
               resnet)
    with pytest.raises(CheckpointError, match=r"resnet18_statedict.pt is a ResNet-18 classifier state dict .*"
                                              r"train --backbone-weights .*resnet18_statedict.pt"):
        _check(["ort"], resnet, onnx_path.parent, None, tmp_path, synthetic=2, max_tiles=1)
    other = tmp_path / "fcn_statedict.pt"  # an FCN state dict, not the parent of the export
    state = torch.load(checkpoint_path, weights_only=True)["state_dict"]
    torch.save({k: v + 1 if k == "final_conv.bias" else v for k, v in state.items()}, other)
    with pytest.raises(Exception, match=rf"fcn.onnx is stale for {other}: it was made from {checkpoint_path} .*"
                                        rf"check: --model {checkpoint_path}\)"):
        _check(["ort"], other, onnx_path.parent, None, tmp_path, synthetic=2, max_tiles=1)
