"""The confusion-matrix metrics against hand-computed matrices and a brute-force reference."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fcn_deploy.errors import UsageError
from fcn_deploy.metrics import ConfusionMatrix


def test_hand_computed_matrix_with_ignore_and_absent_class():
    # 4 classes; class 3 appears nowhere; 255 and 7 (>= num_classes) in the target are ignored
    target = np.array([[0, 0, 1, 1],
                       [2, 2, 255, 7]], np.uint8)
    pred = np.array([[0, 1, 1, 1],
                     [2, 0, 3, 3]], np.uint8)
    cm = ConfusionMatrix(4)
    cm.update(target, pred)
    expected = np.array([[1, 1, 0, 0],
                         [0, 2, 0, 0],
                         [1, 0, 1, 0],
                         [0, 0, 0, 0]])
    assert cm.matrix.dtype == np.int64
    assert np.array_equal(cm.matrix, expected)
    m = cm.compute()
    assert m.pixel_acc == pytest.approx(4 / 6)
    assert m.class_acc == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
    assert m.iou[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(m.iou[3])  # absent from target and prediction
    assert m.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    d = m.as_dict()
    assert d["iou"][3] is None and d["miou"] == pytest.approx(m.miou)
    assert set(d) == {"pixel_acc", "class_acc", "iou", "miou"}


def test_class_only_in_prediction_counts_as_zero_iou():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0, 0, 1]), np.array([0, 2, 0, 1]))
    m = cm.compute()
    assert m.iou == pytest.approx([2 / 3, 1.0, 0.0])  # class 2: a false positive, no target
    assert m.miou == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m.class_acc == pytest.approx((2 / 3 + 1) / 2)  # only classes present in the target


def test_torch_tensors_any_shape_and_merge():
    target = torch.tensor([[[0, 1], [1, 255]], [[2, 2], [0, 1]]], dtype=torch.int64)
    pred = torch.tensor([[[0, 1], [0, 2]], [[2, 1], [0, 1]]], dtype=torch.int64)
    whole = ConfusionMatrix(3)
    whole.update(target, pred)
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(target[0], pred[0])
    b.update(target[1].numpy(), pred[1].numpy())
    assert a.merge(b) is a
    assert np.array_equal(a.matrix, whole.matrix)
    assert whole.matrix.sum() == 7
    assert np.array_equal(whole.matrix, [[2, 0, 0], [1, 2, 0], [0, 1, 1]])


def test_empty_matrix_is_nan():
    m = ConfusionMatrix(2).compute()
    assert math.isnan(m.pixel_acc) and math.isnan(m.class_acc) and math.isnan(m.miou)
    assert m.as_dict() == {"pixel_acc": None, "class_acc": None, "iou": [None, None], "miou": None}
    cm = ConfusionMatrix(2)
    cm.update(np.full((3, 3), 255), np.zeros((3, 3)))  # every pixel void
    assert cm.matrix.sum() == 0


def test_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(UsageError, match="shape"):
        cm.update(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(UsageError, match=r"\[0, 3\)"):
        cm.update(np.zeros(4), np.array([0, 1, 3, 0]))
    with pytest.raises(UsageError, match="merge"):
        cm.merge(ConfusionMatrix(4))


def _brute_force(target, pred, k):
    mat = np.zeros((k, k), np.int64)
    for t, p in zip(target.ravel().tolist(), pred.ravel().tolist()):
        if t != 255 and t < k:
            mat[t, p] += 1
    return mat


@settings(deadline=None)  # the example count of the active profile (conftest.py)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_matches_brute_force(k, n, seed):
    rng = np.random.default_rng(seed)
    target = rng.choice(np.r_[np.arange(k + 2), 255], size=n).astype(np.uint8)
    pred = rng.integers(0, k, size=n).astype(np.uint8)
    cm = ConfusionMatrix(k)
    cm.update(target, pred)
    mat = _brute_force(target, pred, k)
    assert np.array_equal(cm.matrix, mat)
    m = cm.compute()
    if mat.sum():
        assert m.pixel_acc == pytest.approx(np.trace(mat) / mat.sum())
    for c in range(k):
        union = mat[c].sum() + mat[:, c].sum() - mat[c, c]
        assert (math.isnan(m.iou[c]) and union == 0) or m.iou[c] == pytest.approx(mat[c, c] / union)


def test_module_does_not_import_torch():
    code = "import sys, fcn_deploy.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- boundaries and documented contracts (found by mutation testing, docs/testing.md) -------------

def test_updates_accumulate_over_batches():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 1]), np.array([0, 1]))
    cm.update(np.array([1, 1]), np.array([0, 1]))
    assert np.array_equal(cm.matrix, [[1, 0], [1, 2]])


def test_target_ids_outside_the_classes_are_left_out():
    """Negative ids and ids >= num_classes in the target count nowhere; num_classes - 1 counts."""
    cm = ConfusionMatrix(3)
    cm.update(np.array([-1, -5, 3, 4, 2, 0]), np.array([0, 1, 2, 0, 2, 0]))
    assert np.array_equal(cm.matrix, [[1, 0, 0], [0, 0, 0], [0, 0, 1]])


def test_predicted_id_equal_to_num_classes_is_refused():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1]), np.array([2, 2]))  # the largest valid id
    with pytest.raises(UsageError, match=r"got 0\.\.3"):
        cm.update(np.array([0, 1]), np.array([0, 3]))
    with pytest.raises(UsageError, match=r"got -1\.\.1"):
        cm.update(np.array([0, 1]), np.array([-1, 1]))
    assert cm.matrix.sum() == 2  # a refused batch adds nothing


def test_ignore_index_even_when_it_is_a_valid_class_id():
    cm = ConfusionMatrix(300)  # 255 would be a class, but stays void by default
    cm.update(np.array([255, 254]), np.array([0, 254]))
    assert cm.matrix.sum() == 1 and cm.matrix[254, 254] == 1
    cm = ConfusionMatrix(4, ignore_index=2)
    cm.update(np.array([2, 3, 255]), np.array([0, 3, 1]))
    assert cm.matrix.sum() == 1 and cm.matrix[3, 3] == 1


def test_zero_classes_refused():
    with pytest.raises(UsageError, match="num_classes must be positive, got 0"):
        ConfusionMatrix(0)


def test_tensors_that_track_gradients_are_accepted():
    target = torch.tensor([[0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    cm = ConfusionMatrix(2)
    cm.update(target, torch.tensor([[0, 1], [0, 1]]))
    assert np.array_equal(cm.matrix, [[1, 0], [1, 2]])


def test_compute_warns_nothing_for_absent_classes_or_no_pixels():
    """Undefined metrics are NaN silently: no numpy divide or empty-mean RuntimeWarning."""
    import warnings

    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 0]), np.array([0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = cm.compute()
        empty = ConfusionMatrix(2).compute()
    assert m.class_acc == pytest.approx(0.5) and math.isnan(m.iou[2])
    assert math.isnan(empty.class_acc) and math.isnan(empty.miou) and math.isnan(empty.pixel_acc)
