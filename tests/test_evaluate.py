"""`fcn-deploy evaluate`: mIoU of whole images through tiled inference, checked against counts
made by hand with a runner double; JSON fields and the prediction grid on the fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fcn_deploy.errors import DatasetError
from fcn_deploy.report import colorize, prediction_grid
from fcn_deploy.runners.base import Runner, TensorSpec, argmax_labels
from fcn_deploy.defaults import VOID_COLOR
from fcn_deploy.voc import VOCSample

RED, GREEN = (255, 0, 0), (0, 255, 0)
COLORMAP = [[0, 0, 0], [128, 0, 0], [0, 128, 0]]


class ColourRunner(Runner):
    """Logits from each pixel's own colour: class 0 a constant 0.5, class 1 the red channel,
    class 2 the green one. Red pixels -> 1, green -> 2, black -> 0 (with ImageNet or identity
    normalisation alike), so the stitched prediction is known whatever the tiling."""

    name = "colour"

    def _activate(self) -> None:
        self.input_spec = TensorSpec("image", (-1, 3, 320, 480), "float32")
        self.meta = {"classes": ["background", "red", "green"], "colormap": COLORMAP,
                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                     "tile_hw": [320, 480], "precision": "fp32", "num_classes": 3}

    def _infer(self, tiles: np.ndarray, output: str) -> np.ndarray:
        logits = np.stack([np.full_like(tiles[:, 0], 0.5), tiles[:, 0], tiles[:, 1]], axis=1)
        return logits if output == "logits" else argmax_labels(logits)

    def _deactivate(self) -> None:
        pass


def _sample(tmp_path, name: str, rgb: np.ndarray, label: np.ndarray) -> VOCSample:
    image_path, label_path = tmp_path / f"{name}.png", tmp_path / f"{name}_label.png"
    Image.fromarray(rgb, "RGB").save(image_path)
    Image.fromarray(label, "L").save(label_path)
    return VOCSample(name, image_path, label_path)


@pytest.fixture()
def hand_made(tmp_path):
    # A 40x60: red columns 0-29 (-> 1), black 30-59 (-> 0); label 1 in columns 0-19, 0 elsewhere,
    # row 0 void.
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :30] = RED
    la = np.zeros((40, 60), np.uint8)
    la[:, :20] = 1
    la[0] = 255
    # B 30x50: green rows 0-14 (-> 2), black rows 15-29 (-> 0); label 2 on top, 1 below.
    b = np.zeros((30, 50, 3), np.uint8)
    b[:15] = GREEN
    lb = np.full((30, 50), 2, np.uint8)
    lb[15:] = 1
    # C 400x500 (2x2 tiles): all green (-> 2); label 2 except a 10x10 block of 0.
    c = np.zeros((400, 500, 3), np.uint8)
    c[:] = GREEN
    lc = np.full((400, 500), 2, np.uint8)
    lc[100:110, 200:210] = 0
    return [_sample(tmp_path, n, rgb, lab) for n, rgb, lab in (("a", a, la), ("b", b, lb), ("c", c, lc))]


def test_miou_equals_hand_computation(hand_made):
    from fcn_deploy.evaluate import evaluate_runner

    with ColourRunner() as runner:
        result, kept = evaluate_runner(runner, hand_made, batch_size=3, grid_columns=2)
    # Counts by hand (rows = label, columns = prediction):
    #   A: label1/pred1 39*20 = 780, label0/pred1 39*10 = 390, label0/pred0 39*30 = 1170
    #   B: label2/pred2 15*50 = 750, label1/pred0 15*50 = 750
    #   C: label2/pred2 200000 - 100 = 199900, label0/pred2 100
    expected = [[1170, 390, 100], [750, 780, 0], [0, 0, 750 + 199900]]
    assert result["confusion_matrix"] == expected
    iou = [1170 / (1660 + 1920 - 1170), 780 / (1530 + 1170 - 780), 200650 / 200750]
    assert result["iou"]["background"] == pytest.approx(100 * iou[0])
    assert result["iou"]["red"] == pytest.approx(100 * iou[1])
    assert result["iou"]["green"] == pytest.approx(100 * iou[2])
    assert result["miou"] == pytest.approx(100 * sum(iou) / 3)
    assert result["pixel_acc"] == pytest.approx(100 * (1170 + 780 + 200650) / 203840)
    assert result["class_acc"] == pytest.approx(100 * (1170 / 1660 + 780 / 1530 + 1.0) / 3)
    assert result["images"] == 3 and result["pixels"] == 203840
    assert result["tiles"] == 1 + 1 + 4
    assert result["images_per_s"] > 0 and result["inference_seconds"] > 0
    assert [k[1].shape for k in kept] == [(40, 60), (30, 50)]


def test_label_size_mismatch_names_files(hand_made, tmp_path):
    from fcn_deploy.evaluate import evaluate_runner

    bad = _sample(tmp_path, "bad", np.zeros((40, 60, 3), np.uint8), np.zeros((40, 61), np.uint8))
    with ColourRunner() as runner, pytest.raises(DatasetError, match=r"bad_label\.png is 40x61 .*bad\.png is 40x60"):
        evaluate_runner(runner, [hand_made[0], bad])


def test_prediction_grid_layout():
    a_rgb = np.zeros((40, 60, 3), np.uint8)
    a_pred = np.ones((40, 60), np.uint8)
    a_lab = np.zeros((40, 60), np.uint8)
    a_lab[0] = 255
    b = (np.zeros((30, 50, 3), np.uint8), np.full((30, 50), 2, np.uint8), np.full((30, 50), 2, np.uint8))
    grid = prediction_grid([(a_rgb, a_pred, a_lab), b], COLORMAP, height=160, gap=4)
    assert grid.shape == (3 * 160 + 2 * 4, 240 + 4 + 267, 3)  # 50 * 160 / 30 = 266.7 -> 267
    assert tuple(grid[160 + 4 + 10, 10]) == (128, 0, 0)  # prediction row: class 1 colour
    assert tuple(grid[2 * (160 + 4) + 1, 10]) == VOID_COLOR  # label row 0 is void (4 rows after x4)
    assert tuple(grid[2 * (160 + 4) + 10, 10]) == (0, 0, 0)
    assert tuple(grid[160 + 4 + 10, 240 + 4 + 10]) == (0, 128, 0)
    assert tuple(grid[10, 240]) == (255, 255, 255)  # the gap between columns
    assert colorize(np.array([[0, 2, 255, 7]], np.uint8), COLORMAP).tolist() == [
        [[0, 0, 0], [0, 128, 0], list(VOID_COLOR), [0, 0, 0]]]


def test_evaluate_cli_json_and_grid(onnx_path, voc_root, tmp_path):
    from click.testing import CliRunner

    from fcn_deploy.cli import cli
    from fcn_deploy.defaults import VOC_CLASSES
    from fcn_deploy.voc import image_hw, list_split

    report, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    args = ["evaluate", "--voc-root", str(voc_root), "--backend", "ort", "--model", str(onnx_path),
            "--report", str(report), "--grid", str(grid), "--max-images", "2", "--batch-size", "2"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "mIoU" in res.output and "tv/monitor" in res.output
    data = json.loads(report.read_text())
    for key in ("voc_root", "split", "backend", "precision", "images", "pixels", "pixel_acc", "class_acc",
                "miou", "iou", "confusion_matrix", "seconds", "images_per_s", "inference_seconds"):
        assert key in data, key
    assert (data["split"], data["backend"], data["precision"], data["images"]) == ("val", "ort", "fp32", 2)
    assert list(data["iou"]) == list(VOC_CLASSES)
    samples = list_split(voc_root, "val")[:2]
    sizes = [image_hw(s.image_path) for s in samples]
    assert data["pixels"] <= sum(h * w for h, w in sizes)
    present = [v for v in data["iou"].values() if v is not None]
    assert data["miou"] == pytest.approx(sum(present) / len(present))
    widths = [max(1, round(w * 160 / h)) for h, w in sizes]
    width, height = Image.open(grid).size  # the grid, row labels on its left and a legend below
    assert width > sum(widths) + 4 * (len(widths) - 1) and height > 3 * 160 + 8
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "exists; pass --force" in again.output


def test_label_pixels_outside_the_model_classes_are_counted(hand_made):
    from fcn_deploy.evaluate import evaluate_runner

    label = np.asarray(Image.open(hand_made[1].label_path)).copy()
    label[:2, :5] = 7  # 10 pixels of a class the 3-class model does not have
    Image.fromarray(label, "L").save(hand_made[1].label_path)
    with ColourRunner() as runner:
        result, _ = evaluate_runner(runner, hand_made)
    assert result["label_pixels_outside_classes"] == 10


def test_evaluate_cli_warns_about_a_model_with_fewer_classes(voc_root, tmp_path):
    """A 5-class model on 21-class VOC labels: the dropped label pixels are reported once."""
    import re

    from click.testing import CliRunner

    from fcn_deploy.cli import cli
    from fcn_deploy.model import FCN, save_checkpoint

    model = tmp_path / "five.pt"
    save_checkpoint(model, FCN(num_classes=5).eval())
    res = CliRunner().invoke(cli, ["evaluate", "--voc-root", str(voc_root), "--backend", "torch", "--model",
                                   str(model), "--max-images", "1"])
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.stdout.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and re.search(r"\d+ label pixels .*outside the model's 5 classes", warnings[0])


def test_evaluate_checks_report_and_grid_paths_before_the_work(voc_root, tmp_path, monkeypatch):
    import fcn_deploy.runners as runners
    from fcn_deploy.errors import FcnDeployError
    from fcn_deploy.evaluate import evaluate

    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(runners, "open_runner", lambda *a, **k: pytest.fail("loaded a model before checking"))
    for option in ("report", "grid"):
        with pytest.raises(FcnDeployError, match=f"--{option} .*afile/out: cannot create a folder there"):
            evaluate(voc_root, **{option: tmp_path / "afile" / "out"})


# -- pictures and the table that explain themselves (issue 24) --------------------------------------
LEGEND_COLOURS = [[10, 200, 10], [200, 10, 200], [10, 10, 250], [250, 250, 0]]


def test_labelled_grid_has_row_labels_and_a_legend_of_the_classes_present():
    from fcn_deploy.report import GRID_ROWS, labelled_prediction_grid

    rgb = np.full((40, 60, 3), 255, np.uint8)
    pred = np.zeros((40, 60), np.uint8)
    pred[:, 30:] = 1
    label = np.full((40, 60), 2, np.uint8)
    label[0] = 255  # void shown too; class 3 appears nowhere
    samples = [(rgb, pred, label)]
    out = labelled_prediction_grid(samples, LEGEND_COLOURS, ["grass", "plum", "sea", "sun"], height=160, gap=4)
    grid = prediction_grid(samples, LEGEND_COLOURS, height=160, gap=4)
    left = out.shape[1] - grid.shape[1]
    assert left > 40 and np.array_equal(out[:grid.shape[0], left:], grid)  # the grid, unchanged
    for r in range(len(GRID_ROWS)):  # each row's label: dark ink beside its row
        band = out[r * 164: r * 164 + 160, :left]
        assert (band.max(axis=-1) < 100).sum() > 30, GRID_ROWS[r]
    legend = out[grid.shape[0]:]
    assert legend.shape[0] > 20 and (legend.max(axis=-1) < 100).sum() > 100  # its title and names

    def has(colour):
        return bool(np.all(legend == colour, axis=-1).sum() >= 25)  # a swatch, not a stray pixel

    assert has(LEGEND_COLOURS[0]) and has(LEGEND_COLOURS[1]) and has(LEGEND_COLOURS[2]) and has(VOID_COLOR)
    assert not has(LEGEND_COLOURS[3])  # only the classes present


def test_table_shows_n_a_with_a_footnote_for_a_class_without_label_pixels():
    from fcn_deploy.evaluate import format_results

    result = {"backend": "ort", "images": 2, "split": "val", "pixel_acc": 60.0, "class_acc": 60.0, "miou": 30.0,
              "images_per_s": 1.0, "iou": {"background": 60.0, "cat": 0.0, "dog": None},
              "confusion_matrix": [[6, 4, 0], [0, 0, 0], [0, 0, 0]]}
    text = format_results(result)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:5]}
    assert rows == {"background": ["60.00", "10", "6"], "cat": ["n/a*", "0", "4"], "dog": ["n/a*", "0", "0"]}
    assert "* n/a: no label pixel of this class (2 classes)" in text and "counts as 0 (1 here)" in text
