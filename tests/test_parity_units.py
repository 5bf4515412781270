"""Unit tests of the parity metrics and thresholds (fcn_deploy/parity/metrics.py, thresholds.py):
boundary values, padding, NaN handling and tie-breaks, on small hand-made logits (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fcn_deploy.parity.metrics import ParityAccumulator, compare_logits, histogram_quantile
from fcn_deploy.parity.thresholds import apply_thresholds, parse_thresholds, raise_on_failures
from fcn_deploy.errors import UsageError, VerificationError


def _logits(labels: np.ndarray, c: int = 3, value: float = 2.0) -> np.ndarray:
    """(N, H, W) class ids -> (N, C, H, W) float32 logits with ``value`` at the class, 0 elsewhere."""
    out = np.zeros((labels.shape[0], c, *labels.shape[1:]), dtype=np.float32)
    for k in range(c):
        out[:, k][labels == k] = value
    return out


# -- metrics: padding, NaN, boundaries -------------------------------------------------------
def test_padding_pixels_count_in_no_metric():
    """A flip and a large difference on padding pixels change nothing; each metric is the one of
    the valid pixels alone (the bug: a field that silently counts padding)."""
    ref_lab = np.array([[[0, 1, 2], [1, 2, 0]]], dtype=np.uint8)  # 1 tile, 2x3
    ref = _logits(ref_lab)
    out = ref.copy()
    out[0, :, :, 2] = 0.0
    out[0, 1, :, 2] = 50.0  # the last column (padding) predicts class 1 with a diff of 50
    out[0, 0, 0, 0] = 2.5  # one valid diff of 0.5 that keeps the class
    labels = np.array([[[0, 1, 1], [1, 2, 1]]], dtype=np.uint8)  # ground truth, padding column wrong
    valid = np.ones((1, 2, 3), dtype=bool)
    valid[0, :, 2] = False
    acc = ParityAccumulator(3, keep_worst=4)
    acc.update(ref, out, labels=labels, valid=valid)
    res = acc.result()
    same = ParityAccumulator(3)  # the valid pixels only, as a 2x2 tile
    same.update(ref[..., :2], out[..., :2], labels=labels[..., :2])
    assert res == same.result()
    assert res["pixels"] == 4 and res["agreement"] == 100.0 and res["max_abs"] == 0.5
    assert res["mean_abs"] == pytest.approx(0.5 / 12)
    assert res["miou_vs_reference"] == 100.0 and res["miou_gt_change"] == 0.0
    assert res["miou_gt_reference"] == 100.0
    assert acc.tile_agreement == [100.0] and acc.worst_tiles() == []
    # a valid mask that is all True is the same as no mask
    full = ParityAccumulator(3)
    full.update(ref, out, labels=labels, valid=np.ones((1, 2, 3), dtype=bool))
    plain = ParityAccumulator(3)
    plain.update(ref, out, labels=labels)
    assert full.result() == plain.result() and full.result()["pixels"] == 6


def test_worst_tile_mask_leaves_out_padding_and_a_tile_of_padding_only_agrees():
    ref_lab = np.zeros((2, 2, 2), dtype=np.uint8)
    ref = _logits(ref_lab)
    out = _logits(np.ones((2, 2, 2), dtype=np.uint8))  # every pixel flips 0 -> 1
    valid = np.zeros((2, 2, 2), dtype=bool)
    valid[0, 0, 0] = True  # tile 0: one valid pixel; tile 1: padding only
    acc = ParityAccumulator(3, keep_worst=4)
    acc.update(ref, out, valid=valid)
    assert acc.tile_agreement == [0.0, 100.0]  # no pixel: nothing disagrees
    (worst,) = acc.worst_tiles()
    assert worst.index == 0 and worst.mask.tolist() == [[True, False], [False, False]]
    res = acc.result()
    assert res["pixels"] == 1 and res["agreement"] == 0.0 and res["tiles"] == 2
    assert res["max_abs"] == 2.0 and res["mean_abs"] == pytest.approx(4.0 / 3)


def test_nothing_compared_reports_none():
    res = ParityAccumulator(3).result()
    assert res["tiles"] == 0 and res["pixels"] == 0 and res["nonfinite"] == 0
    for key in ("max_abs", "mean_abs", "p99_abs", "cosine_mean", "cosine_min", "agreement",
                "miou_vs_reference", "miou_gt_reference", "miou_gt_backend", "miou_gt_change"):
        assert res[key] is None, key
    pad = ParityAccumulator(3)
    pad.update(np.ones((1, 3, 2, 2), np.float32), np.ones((1, 3, 2, 2), np.float32),
               valid=np.zeros((1, 2, 2), dtype=bool))
    res = pad.result()
    assert res["pixels"] == 0 and res["max_abs"] is None and res["cosine_min"] is None
    assert res["agreement"] is None and res["tiles"] == 1


def test_nan_or_inf_on_either_side_is_counted_and_left_out():
    ref = np.zeros((1, 2, 2, 2), np.float32)
    ref[0, 0] = 1.0
    out = ref.copy()
    out[0, 1, 0, 0] = 0.25
    ref[0, 1, 1, 1] = np.nan  # a non-finite reference value is left out too
    out[0, 0, 1, 0] = -np.inf
    res = compare_logits(ref, out)
    assert res["nonfinite"] == 2
    assert res["max_abs"] == 0.25 and res["mean_abs"] == pytest.approx(0.25 / 8)
    assert math.isfinite(res["cosine_min"])


def test_cosine_of_zero_logits():
    zero = np.zeros((1, 2, 1, 2), np.float32)
    one = np.ones((1, 2, 1, 2), np.float32)
    assert compare_logits(zero, zero)["cosine_min"] == 1.0  # both zero: identical
    assert compare_logits(zero, one)["cosine_min"] == 0.0  # one side zero: nothing in common
    assert compare_logits(one, zero)["cosine_min"] == 0.0
    assert compare_logits(one, -one)["cosine_min"] == pytest.approx(-1.0)
    assert compare_logits(one, 3 * one)["cosine_min"] == pytest.approx(1.0)


def test_channel_count_and_rank_are_checked():
    acc = ParityAccumulator(3)
    with pytest.raises(UsageError, match="2 logit channels, expected 3"):
        acc.update(np.zeros((1, 2, 2, 2), np.float32), np.zeros((1, 2, 2, 2), np.float32))
    with pytest.raises(UsageError, match=r"backend logits \(3, 2, 2\) do not match reference \(3, 2, 2\)"):
        acc.update(np.zeros((3, 2, 2), np.float32), np.zeros((3, 2, 2), np.float32))
    assert acc.result()["tiles"] == 0


def test_worst_tiles_ties_keep_the_earlier_tile_and_keep_worst_zero_keeps_none():
    ref_lab = np.zeros((4, 2, 2), dtype=np.uint8)
    out_lab = ref_lab.copy()
    out_lab[:, 0, 0] = 1  # every tile: 1 of 4 pixels disagrees (75 %)
    out_lab[3, 0, 1] = 1  # tile 3: 2 of 4 (50 %)
    acc = ParityAccumulator(3, keep_worst=2)
    acc.update(_logits(ref_lab), _logits(out_lab))
    assert [(w.index, w.agreement) for w in acc.worst_tiles()] == [(3, 50.0), (0, 75.0)]
    one = ParityAccumulator(3, keep_worst=1)
    one.update(_logits(ref_lab[:3]), _logits(out_lab[:3]))
    assert [w.index for w in one.worst_tiles()] == [0]
    none = ParityAccumulator(3, keep_worst=0)
    none.update(_logits(ref_lab), _logits(out_lab))
    assert none.worst_tiles() == []
    assert compare_logits(_logits(ref_lab), _logits(out_lab))["tiles"] == 4


def test_histogram_quantile_rank_and_cap():
    hist = np.zeros(8, dtype=np.int64)
    hist[2], hist[5] = 99, 1  # 100 values: the 99th smallest is in bin 2, the 100th in bin 5
    edge2, edge5 = 10.0 ** (-10 + 2 / 256), 10.0 ** (-10 + 5 / 256)
    assert histogram_quantile(hist, 0.99, 1.0) == pytest.approx(edge2, rel=1e-12, abs=0)
    assert histogram_quantile(hist, 1.0, 1.0) == pytest.approx(edge5, rel=1e-12, abs=0)
    assert histogram_quantile(hist, 0.0, 1.0) == pytest.approx(edge2, rel=1e-12, abs=0)  # rank at least 1
    assert histogram_quantile(hist, 0.99, 1e-12) == 1e-12  # capped at the maximum
    one = np.zeros(8, dtype=np.int64)
    one[0] = 1
    assert histogram_quantile(one, 0.5, 1.0) == pytest.approx(1e-10, abs=0)


def test_p99_of_zero_tiny_and_huge_differences():
    ref = np.zeros((1, 1, 1, 4), np.float32)
    assert compare_logits(ref, ref)["p99_abs"] == 0.0  # all equal: capped at max_abs 0
    tiny = ref.copy()
    tiny[..., :] = 1e-12  # under the histogram's range: reported as its lowest edge, capped at max
    assert compare_logits(ref, tiny)["p99_abs"] == float(np.float32(1e-12))  # capped at the maximum
    huge = np.full((1, 1, 1, 4), 1e7, np.float32)  # above the range: the maximum, never below it
    assert compare_logits(ref, huge)["p99_abs"] == pytest.approx(1e7)
    near = np.full((1, 1, 1, 200), 985000.0, np.float32)  # in the last bin but one (below 1e6)
    near[..., -1] = 5e6
    p99 = compare_logits(np.zeros_like(near), near)["p99_abs"]
    assert 985000.0 <= p99 <= 985000.0 * 1.0091  # that bin's edge, not the maximum
    hist = np.zeros(16 * 256 + 1, dtype=np.int64)
    hist[-1] = 1
    assert histogram_quantile(hist, 0.99, 5e8) == 5e8
    mixed = np.zeros((1, 1, 1, 200), np.float32)
    mixed[..., :] = 0.001
    mixed[..., -1] = 100.0  # 199 of 200 at 1e-3: p99 (rank 198) is 1e-3 within one bin
    p99 = compare_logits(np.zeros_like(mixed), mixed)["p99_abs"]
    assert 0.001 <= p99 <= 0.001 * 1.0091


def test_ground_truth_change_is_backend_minus_reference():
    ref_lab = np.array([[[0, 1], [1, 0]]], dtype=np.uint8)
    gt = ref_lab.copy()
    out_lab = ref_lab.copy()
    out_lab[0, 0, 0] = 1  # the backend is wrong on one pixel
    acc = ParityAccumulator(2)
    acc.update(_logits(ref_lab, 2), _logits(out_lab, 2), labels=gt)
    res = acc.result()
    assert res["miou_gt_reference"] == 100.0
    assert res["miou_gt_backend"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert res["miou_gt_change"] == pytest.approx(res["miou_gt_backend"] - 100.0)
    assert res["miou_gt_change"] < 0


# -- thresholds: limits on both sides of the boundary -----------------------------------------
def _verdicts(precision, metrics, overrides=None):
    return {o.metric: o.passed for o in apply_thresholds("b", precision, metrics, parse_thresholds(overrides))}


def test_a_value_equal_to_the_limit_passes_on_both_sides():
    assert _verdicts("fp32", {"agreement": 99.99, "max_abs": 1e-3, "nonfinite": 0}) == {
        "nonfinite": True, "agreement": True, "max_abs": True}
    assert _verdicts("fp32", {"agreement": 99.98999, "max_abs": 1.00001e-3, "nonfinite": 1}) == {
        "nonfinite": False, "agreement": False, "max_abs": False}
    # miou_gt_change compares |change|: a drop and a gain of 0.5 pass, 0.51 either way fails
    for change, ok in ((0.5, True), (-0.5, True), (0.51, False), (-0.51, False), (0.0, True)):
        assert _verdicts("fp16", {"agreement": 100.0, "miou_gt_change": change})["miou_gt_change"] is ok
    assert _verdicts("fp32", {"agreement": 100.0, "cosine_min": 0.999}, ["fp32.cosine_min=0.999"])["cosine_min"]
    assert not _verdicts("fp32", {"agreement": 100.0, "cosine_min": 0.998}, ["fp32.cosine_min=0.999"])["cosine_min"]


def test_outcome_records_value_limit_and_op():
    (nonfinite, agreement, max_abs) = apply_thresholds("ort", "fp32", {"agreement": 99.0, "max_abs": 5e-4,
                                                                       "nonfinite": 0}, parse_thresholds(None))
    assert agreement.as_dict() == {"metric": "agreement", "op": ">=", "value": 99.0, "limit": 99.99,
                                   "passed": False, "message": agreement.message}
    assert max_abs.as_dict()["op"] == "<=" and max_abs.value == 5e-4 and max_abs.limit == 1e-3
    assert max_abs.message == "ort: max abs logit difference 5.00e-04 <= 1.00e-03"
    assert nonfinite.message == "ort: non-finite (NaN/inf) logits 0 <= 0"
    assert agreement.message == "ort: argmax agreement 99.00% < 99.99% (short by 0.99 points)"
    missing = apply_thresholds("ort", "fp16", {"agreement": 100.0}, parse_thresholds(None))[2]
    assert (missing.metric, missing.value, missing.limit, missing.passed) == ("miou_gt_change", None, 0.5, True)
    assert missing.message == "ort: mIoU change vs ground truth not checked (no data)"


def test_messages_use_enough_decimals_to_tell_value_and_limit_apart():
    ok = apply_thresholds("b", "fp32", {"agreement": 99.99, "max_abs": 0.0}, parse_thresholds(None))
    assert ok[1].message == "b: argmax agreement 99.99% >= 99.99%"
    assert ok[2].message == "b: max abs logit difference 0.00e+00 <= 1.00e-03"
    close = apply_thresholds("b", "fp32", {"agreement": 99.9899}, parse_thresholds(None))[1]
    assert close.message == "b: argmax agreement 99.9899% < 99.9900% (short by 0.0001 points)"
    pts = apply_thresholds("b", "fp16", {"agreement": 99.5, "miou_gt_change": -0.125},
                           parse_thresholds(None))[2]
    assert pts.message == "b: mIoU change vs ground truth 0.12 points <= 0.50 points"


@pytest.mark.parametrize("item, limit", [
    ("fp16.agreement=100", 100.0),  # the upper bound of a percentage is allowed
    ("fp16.agreement=1.5", 1.5),  # just above the fraction range
    ("fp32.max_abs=0", 0.0),  # zero: no difference allowed
    ("fp32.cosine_min=1", 1.0),
    ("fp32.max_abs=50", 50.0),  # not a percentage: no upper bound
    (" fp32.max_abs = 2e-3 ", 2e-3),  # spaces around the parts
])
def test_limits_at_the_edge_of_their_range_are_accepted(item, limit):
    precision, metric = item.split("=")[0].strip().split(".")
    assert parse_thresholds([item])[precision][metric.strip()] == limit


@pytest.mark.parametrize("item, why", [
    ("fp16.agreement=1", "looks like a fraction"),
    ("fp16.agreement=100.001", "cannot exceed 100"),
    ("fp32.max_abs=-0.001", "cannot be negative"),
    ("fp32.cosine_min=1.001", r"similarity in \[0, 1\]"),
    ("fp32.max_abs=nan", "must be finite"),
    ("fp32.max_abs=inf", "must be finite"),
    ("fp32.=1", "PRECISION.METRIC=VALUE"),
    (".max_abs=1", "PRECISION.METRIC=VALUE"),
    ("fp32.max_abs=", "is not a number"),
])
def test_limits_outside_their_range_are_refused(item, why):
    with pytest.raises(UsageError, match=why) as err:
        parse_thresholds([item])
    assert f"--threshold {item!r}" in str(err.value)


def test_unknown_metric_and_precision_list_the_choices():
    with pytest.raises(UsageError, match=r"unknown metric 'speed'; choose from agreement, max_abs, mean_abs, "
                                         r"p99_abs, cosine_min, miou_vs_reference, miou_gt_change$"):
        parse_thresholds(["fp32.speed=1"])
    with pytest.raises(UsageError, match=r"unknown precision 'bf16'; choose from fp32, fp16"):
        parse_thresholds(["bf16.agreement=99"])


def test_off_drops_a_limit_and_a_registered_precision_gets_a_table():
    assert parse_thresholds(["fp32.max_abs=OFF"])["fp32"] == {"agreement": 99.99}
    assert parse_thresholds(["fp16.cosine_min=off"])["fp16"] == {"agreement": 99.5, "miou_gt_change": 0.5}
    assert parse_thresholds([]) == parse_thresholds(None) == {
        "fp32": {"agreement": 99.99, "max_abs": 1e-3}, "fp16": {"agreement": 99.5, "miou_gt_change": 0.5},
        "int8": {"agreement": 99.0, "miou_gt_change": 1.0}}
    assert parse_thresholds(["fp32.mean_abs=1e-4", "fp32.mean_abs=2e-4"])["fp32"]["mean_abs"] == 2e-4


def test_equal_logits_and_absent_classes_warn_nothing():
    """log10(0) of equal logits and 0/0 IoUs of absent classes are expected, not warnings."""
    import warnings

    ref = _logits(np.zeros((1, 2, 2), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = compare_logits(ref, ref.copy())
        acc = ParityAccumulator(3)
        acc.update(ref, ref.copy(), labels=np.zeros((1, 2, 2), dtype=np.uint8))
        acc.result()
    assert res["max_abs"] == 0.0 and res["p99_abs"] == 0.0 and res["miou_vs_reference"] == 100.0


def test_p99_among_zero_differences_is_the_lowest_edge():
    """Values under 1e-10 (here exact zeros) report as 1e-10 when a larger maximum does not cap them."""
    out = np.zeros((1, 1, 1, 200), np.float32)
    out[..., -1] = 1.0
    assert compare_logits(np.zeros_like(out), out)["p99_abs"] == pytest.approx(1e-10, rel=1e-9, abs=0)


def test_mean_is_summed_in_float64():
    out = np.array([2.0 ** 24, 1.0], np.float32).reshape(1, 1, 1, 2)  # float32 sums 2^24 + 1 to 2^24
    assert compare_logits(np.zeros_like(out), out)["mean_abs"] == (2.0 ** 24 + 1) / 2


def test_cosine_of_small_logits():
    """Logits under 1 give a product of norms under 1: still a cosine, not the zero-vector case."""
    ref = np.full((1, 2, 1, 2), 0.1, np.float32)
    assert compare_logits(ref, ref.copy())["cosine_min"] == pytest.approx(1.0)
    out = ref.copy()
    out[0, 0] = -0.1
    assert compare_logits(ref, out)["cosine_min"] == pytest.approx(0.0, abs=1e-12)


def test_labels_all_ignored_give_no_ground_truth_miou():
    ref = _logits(np.zeros((1, 2, 2), dtype=np.uint8))
    acc = ParityAccumulator(3)
    acc.update(ref, ref.copy(), labels=np.full((1, 2, 2), 255, dtype=np.uint8))
    res = acc.result()
    assert res["miou_gt_reference"] is None and res["miou_gt_backend"] is None and res["miou_gt_change"] is None
    assert res["miou_vs_reference"] == 100.0


def test_four_worst_tiles_are_kept_by_default():
    ref_lab = np.zeros((6, 2, 2), dtype=np.uint8)
    out_lab = ref_lab.copy()
    out_lab[:, 0, 0] = 1  # every tile disagrees somewhere
    acc = ParityAccumulator(3)
    acc.update(_logits(ref_lab), _logits(out_lab))
    assert [w.index for w in acc.worst_tiles()] == [0, 1, 2, 3]


def test_differences_are_taken_in_float32():
    """The documented precision: float32 differences (1e8 - 1 rounds to 1e8), float64 sums."""
    ref = np.full((1, 1, 1, 1), 1e8, np.float32)
    out = np.ones((1, 1, 1, 1), np.float32)
    assert compare_logits(ref, out)["max_abs"] == float(np.float32(1e8) - np.float32(1.0)) == 1e8
    assert compare_logits(out, ref)["max_abs"] == 1e8


def test_void_and_padding_are_left_out_even_with_256_classes():
    """Class id 255 is the ignore label of targets: padding (reference side) and void (labels)
    never count, even when 255 is also a channel."""
    ref = np.zeros((1, 256, 1, 2), np.float32)
    ref[0, 0] = 1.0  # the reference says class 0 everywhere
    out = np.zeros_like(ref)
    out[0, 0, 0, 0] = 1.0
    out[0, 7, 0, 1] = 1.0  # the backend says 7 on the padding pixel
    acc = ParityAccumulator(256)
    acc.update(ref, out, labels=np.array([[[0, 255]]], dtype=np.uint8), valid=np.array([[[True, False]]]))
    res = acc.result()
    assert res["miou_vs_reference"] == 100.0 and res["pixels"] == 1
    assert res["miou_gt_reference"] == 100.0 and res["miou_gt_backend"] == 100.0
    both = ParityAccumulator(256)  # no padding, a void label on the pixel where they differ
    both.update(ref, out, labels=np.array([[[0, 255]]], dtype=np.uint8))
    assert both.result()["miou_gt_backend"] == 100.0 and both.result()["miou_gt_change"] == 0.0


def test_a_negative_cosine_is_not_taken_as_its_absolute_value():
    """Only changes (points) compare |value|; a cosine of -0.5 is below a limit of 0.3."""
    assert not _verdicts("fp32", {"agreement": 100.0, "cosine_min": -0.5}, ["fp32.cosine_min=0.3"])["cosine_min"]


def test_values_closer_than_eight_decimals_print_with_eight():
    (out,) = apply_thresholds("b", "fp32", {"agreement": 99.99 - 1e-10}, parse_thresholds(["fp32.max_abs=off"]))[1:]
    assert not out.passed
    assert out.message == "b: argmax agreement 99.99000000% < 99.99000000% (short by 0.00000000 points)"


def test_the_failure_lists_every_failed_metric_of_every_backend():
    limits = parse_thresholds(None)
    outcomes = {"ort": apply_thresholds("ort", "fp32", {"agreement": 99.0, "max_abs": 2e-3}, limits),
                "trt": apply_thresholds("trt", "fp16", {"agreement": 99.6, "miou_gt_change": 1.0}, limits)}
    with pytest.raises(VerificationError) as err:
        raise_on_failures(outcomes)
    assert str(err.value) == (
        "parity check failed: ort: argmax agreement 99.00% < 99.99% (short by 0.99 points); "
        "ort: max abs logit difference 2.00e-03 > 1.00e-03 (over by 1.00e-03); "
        "trt: mIoU change vs ground truth 1.00 points > 0.50 points (over by 0.50 points)")


def test_a_registered_backend_precision_takes_thresholds():
    """int8 (ort-int8) is registered: its limits can be overridden; bf16 (no backend) cannot."""
    assert parse_thresholds(["int8.agreement=99.5"])["int8"] == {"agreement": 99.5, "miou_gt_change": 1.0}
    with pytest.raises(UsageError, match="choose from fp32, fp16, int8$"):
        parse_thresholds(["bf16.agreement=99"])


def test_the_first_equals_and_the_first_dot_split_an_override():
    with pytest.raises(UsageError, match=r"'1=2' is not a number"):
        parse_thresholds(["fp32.max_abs=1=2"])
    with pytest.raises(UsageError, match=r"unknown metric 'max_abs.x'"):
        parse_thresholds(["fp32.max_abs.x=1"])
