"""Training: a short run learns, checkpoints and history, resume, Ctrl-C, errors, CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

from fcn_deploy.cli import cli
from fcn_deploy.errors import (ArtifactExistsError, ArtifactNotFoundError, BackendUnavailableError,
                               DatasetError, FcnDeployError, UsageError)
from fcn_deploy.model import FCN, load_checkpoint
from fcn_deploy.train import history_path, parse_hw, per_image_loss, predict_whole, train
from fcn_deploy.voc import write_synthetic_voc

FAST = dict(crop_hw=(64, 96), batch_size=2, device="cpu", progress=False)


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory):
    """6 images: 5 train (one portrait), 1 val (241x307, smaller than 320x480)."""
    return write_synthetic_voc(tmp_path_factory.mktemp("small_voc"), num_images=6, seed=0)


@pytest.fixture(scope="module")
def three_epochs(small_voc, tmp_path_factory):
    """(checkpoint path, history) of an uninterrupted 3-epoch run."""
    out = tmp_path_factory.mktemp("run") / "model.pt"
    return out, train(small_voc, out, epochs=3, **FAST)


def test_short_training_lowers_the_loss_and_writes_artifacts(three_epochs):
    out, history = three_epochs
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    for e in history:
        assert e["train_images"] == 4 and e["batch_size"] == 2 and e["images_per_s"] > 0
        assert 0 <= e["val_pixel_acc"] <= 1 and 0 <= e["val_miou"] <= 1
        assert 0 <= e["train_pixel_acc"] <= 1 and e["device"] == "cpu"
    model, meta = load_checkpoint(out)
    assert meta["history"] == history and meta["train_crop"] == [64, 96]
    saved = json.loads(history_path(out).read_text())
    assert history_path(out).name == "model.history.json"
    assert saved["history"] == history and saved["checkpoint"] == "model.pt"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.history.json", "model.pt"]


def test_interrupt_keeps_last_checkpoint_and_resume_matches(small_voc, three_epochs, tmp_path,
                                                           monkeypatch):
    """Ctrl-C while epoch 2's checkpoint is half written: epoch 1's stays intact; resuming
    then gives the same epoch 2 as the uninterrupted run."""
    out = tmp_path / "model.pt"
    real_save, calls = torch.save, []

    def save_then_interrupt(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            if hasattr(f, "write"):  # save_checkpoint serialises into memory first
                f.write(b"PK\x03\x04 half a checkpoint")
            else:
                with open(f, "wb") as fh:
                    fh.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(small_voc, out, epochs=2, **FAST)
    monkeypatch.undo()
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.history.json", "model.pt"]
    _, meta = load_checkpoint(out)
    assert [e["epoch"] for e in meta["history"]] == [1]
    assert len(json.loads(history_path(out).read_text())["history"]) == 1

    history = train(small_voc, out, epochs=2, resume=True, **FAST)
    _, ref = three_epochs
    assert [e["epoch"] for e in history] == [1, 2]
    for key in ("train_loss", "train_pixel_acc", "val_pixel_acc", "val_miou"):
        assert [e[key] for e in history] == pytest.approx([e[key] for e in ref[:2]], rel=1e-5), key


def test_resume_when_done_trains_nothing(small_voc, three_epochs):
    out, ref_history = three_epochs
    before = out.stat().st_mtime_ns
    assert train(small_voc, out, epochs=2, resume=True, **FAST) == ref_history
    assert out.stat().st_mtime_ns == before


def test_predict_whole_pads_to_multiples_of_32():
    torch.manual_seed(0)
    model = FCN().eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        y = predict_whole(model, x)
        padded = torch.zeros(1, 3, 64, 96)
        padded[..., :50, :70] = x
        ref = model(padded)[..., :50, :70]
    assert y.shape == (1, 21, 50, 70) and torch.equal(y, ref)


def test_per_image_loss_ignores_void():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    target = torch.randint(0, 4, (2, 3, 5))
    target[0, 0, :] = 255
    target[1] = 255  # no valid pixel at all
    loss = per_image_loss(logits, target)
    valid = target[0] != 255
    ce = F.cross_entropy(logits[0:1], target[0:1], ignore_index=255, reduction="none")
    expected0 = ce[0][valid].mean()
    assert loss.shape == (2,)
    assert loss[0] == pytest.approx(float(expected0)) and float(loss[1]) == 0.0


# --- refusals -------------------------------------------------------------------------------------

def test_existing_output_needs_force(small_voc, tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"old")
    with pytest.raises(ArtifactExistsError, match="model.pt exists; pass --force"):
        train(small_voc, out, epochs=1, **FAST)
    assert out.read_bytes() == b"old"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(crop_hw=(60, 96)), UsageError, "multiples of 32"),
    (dict(crop_hw=(1024, 1024)), DatasetError, "as large as the crop 1024x1024"),
    (dict(device="tpu"), UsageError, "--device"),
    (dict(resume=True), ArtifactNotFoundError, "--resume: checkpoint .*model.pt not found"),
    (dict(backbone_weights="w.pth", pretrained=True), UsageError, "not both"),
    (dict(backbone_weights="absent.pth"), ArtifactNotFoundError, "absent.pth"),
    (dict(epochs=0), UsageError, "--epochs"),
    (dict(lr=0.0), UsageError, "--lr"),
])
def test_bad_arguments(small_voc, tmp_path, kwargs, error, match):
    args = {**FAST, "epochs": 1, **kwargs}
    with pytest.raises(error, match=match):
        train(small_voc, tmp_path / "model.pt", **args)
    assert not (tmp_path / "model.pt").exists()


def test_unwritable_output_is_refused_before_training(small_voc, tmp_path, monkeypatch):
    import fcn_deploy.train as train_module

    (tmp_path / "afile").write_text("a file, not a folder")
    monkeypatch.setattr(train_module, "train_epoch", lambda *a, **k: pytest.fail("trained before checking -o"))
    with pytest.raises(FcnDeployError, match=r"-o .*afile/m.pt: cannot create a folder there, .*afile is a file"):
        train(small_voc, tmp_path / "afile" / "m.pt", epochs=1, **FAST)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda(small_voc, tmp_path):
    with pytest.raises(BackendUnavailableError, match="--device cuda"):
        train(small_voc, tmp_path / "model.pt", **{**FAST, "device": "cuda"})


@pytest.mark.gpu
def test_training_on_cuda(small_voc, tmp_path):
    out = tmp_path / "model.pt"
    history = train(small_voc, out, epochs=3, **{**FAST, "device": "cuda"})
    assert all(e["device"].startswith("cuda") for e in history)
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    model, meta = load_checkpoint(out)  # loads on the CPU
    assert meta["history"] == history and next(model.parameters()).device.type == "cpu"


def test_parse_hw():
    assert parse_hw("320x480") == (320, 480) and parse_hw(" 64 X 96 ") == (64, 96)
    for bad in ("320", "320x", "axb", "320x481", "0x32", "-32x32", ""):
        with pytest.raises(UsageError, match="--crop"):
            parse_hw(bad)


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_synth_voc_and_train(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["synth-voc", str(tmp_path / "data"), "--num-images", "4", "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert "3 train, 1 val" in res.stdout
    out = tmp_path / "m.pt"
    res = runner.invoke(cli, ["train", "--voc-root", str(tmp_path / "data"), "-o", str(out),
                              "--epochs", "1", "--crop", "64x96", "--batch-size", "2",
                              "--max-train-images", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert re.search(r"1 epochs \(val mIoU \d+\.\d\d%", res.stdout) and "m.history.json" in res.stdout
    assert load_checkpoint(out)[1]["history"][0]["train_images"] == 2


@pytest.mark.parametrize("args, match", [
    (["synth-voc", "{tmp}/data"], "already holds a dataset; pass --force"),
    (["train", "--voc-root", "{tmp}/nowhere", "-o", "{tmp}/m.pt"], "VOC root .*nowhere not found"),
    (["train", "--voc-root", "{tmp}/data", "-o", "{tmp}/m.pt", "--crop", "320by480"], "--crop must look like HxW"),
    (["train", "--voc-root", "{tmp}/data", "-o", "{tmp}/old.pt"], "old.pt exists; pass --force"),
    (["train", "--voc-root", "{tmp}/data", "-o", "{tmp}/m.pt", "--resume"], "--resume: checkpoint"),
    (["train", "--voc-root", "{tmp}/data", "-o", "{tmp}/m.pt", "--crop", "1024x1024"], "crop 1024x1024"),
    (["train", "--voc-root", "{tmp}/data", "-o", "{tmp}/old.pt/m.pt"], "old.pt is a file"),
])
def test_cli_errors_are_one_line(tmp_path, args, match):
    write_synthetic_voc(tmp_path / "data", num_images=2)
    (tmp_path / "old.pt").write_bytes(b"x")
    res = CliRunner().invoke(cli, [a.format(tmp=tmp_path) for a in args])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in res.output


# --- issue 24: what failed only after a full epoch, and resume with nothing to do ---------------
@pytest.fixture()
def voc_copy(small_voc, tmp_path):
    """A copy of small_voc (VOC2012 folder) and the name of its val image."""
    import shutil

    root = tmp_path / "VOC2012"
    shutil.copytree(small_voc, root)
    name = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    return root, name


@pytest.mark.parametrize("damage", ["garbage", "wrong size"])
def test_bad_validation_label_is_found_before_the_first_epoch(voc_copy, tmp_path, monkeypatch, damage):
    import fcn_deploy.train as train_module
    from PIL import Image

    root, name = voc_copy
    label = root / "SegmentationClass" / f"{name}.png"
    if damage == "garbage":
        label.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    else:
        Image.new("P", (17, 11)).save(label)
    monkeypatch.setattr(train_module, "train_epoch", lambda *a, **k: pytest.fail("trained an epoch first"))
    with pytest.raises(DatasetError, match=rf"label .*{name}\.png (is unreadable|is 11x17 but image)"):
        train(root, tmp_path / "m.pt", epochs=1, **FAST)
    assert not (tmp_path / "m.pt").exists()


def test_full_disk_at_output_is_found_before_the_first_epoch(small_voc, tmp_path, monkeypatch):
    import collections
    import shutil

    import fcn_deploy.train as train_module
    from fcn_deploy.errors import DiskFullError

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2 << 20, 1 << 20, 1 << 20))  # 1 MiB free
    monkeypatch.setattr(train_module, "train_epoch", lambda *a, **k: pytest.fail("trained an epoch first"))
    with pytest.raises(DiskFullError, match=r"^-o .*m\.pt: 1\.0 MiB free on its disk, a checkpoint needs"):
        train(small_voc, tmp_path / "m.pt", epochs=1, **FAST)
    assert list(tmp_path.iterdir()) == []  # the probe is gone


def test_cli_resume_with_nothing_left_says_so(small_voc, three_epochs):
    out, _ = three_epochs
    before = out.stat().st_mtime_ns
    res = CliRunner().invoke(cli, ["train", "--voc-root", str(small_voc), "-o", str(out), "--epochs", "3",
                                   "--resume", "--crop", "64x96", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "wrote" not in res.stdout and "has 3 epochs already" in res.stdout and "nothing to do" in res.stdout
    assert re.search(r"val mIoU \d+\.\d\d%", res.stdout) and out.stat().st_mtime_ns == before
