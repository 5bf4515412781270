"""The FCN (shapes, bilinear upsampling) and its checkpoints (round trip, chapter state dicts,
refusals)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from fcn_deploy.errors import ArtifactNotFoundError, CheckpointError
from fcn_deploy.model import FCN, bilinear_kernel, load_checkpoint, read_checkpoint, save_checkpoint
from fcn_deploy.defaults import VOC_CLASSES, VOC_COLORMAP


@pytest.fixture(scope="module")
def net() -> FCN:
    torch.manual_seed(0)
    return FCN().eval()


def chapter_net(num_classes: int = 21) -> nn.Sequential:
    """The d2l chapter's construction of ``net``, verbatim."""
    pretrained_net = torchvision.models.resnet18(weights=None)
    net = nn.Sequential(*list(pretrained_net.children())[:-2])
    net.add_module("final_conv", nn.Conv2d(512, num_classes, kernel_size=1))
    net.add_module("transpose_conv", nn.ConvTranspose2d(num_classes, num_classes,
                                                        kernel_size=64, padding=16, stride=32))
    return net


@pytest.mark.parametrize("hw", [(32, 32), (64, 96), (96, 64), (160, 224)])
def test_output_shape_equals_input_shape(net, hw):
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, len(VOC_CLASSES), *hw)
    assert y.dtype == torch.float32


def test_transpose_conv_initialised_bilinear_and_final_conv_xavier(net):
    assert torch.equal(net.transpose_conv.weight, bilinear_kernel(21, 21, 64))
    bound = (6 / (512 + 21)) ** 0.5  # xavier_uniform_ of a 1x1 conv 512 -> 21
    w = net.final_conv.weight
    assert w.abs().max() <= bound and w.std() > bound / 3


def test_bilinear_kernel_values():
    k = bilinear_kernel(2, 3, 4)
    assert k.shape == (2, 3, 4, 4)
    row = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.allclose(k[1, 1], row[:, None] * row[None, :])
    assert torch.count_nonzero(k[0, 1]) == 0 and torch.count_nonzero(k[1, 2]) == 0


def test_bilinear_transposed_conv_doubles_image_like_interpolation():
    """The chapter's experiment: a stride-2 transposed conv with the bilinear kernel doubles an
    image; away from the border it equals bilinear interpolation (align_corners=False)."""
    torch.manual_seed(1)
    conv_trans = nn.ConvTranspose2d(3, 3, kernel_size=4, padding=1, stride=2, bias=False)
    conv_trans.weight.data.copy_(bilinear_kernel(3, 3, 4))
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        y = conv_trans(x)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert y.shape == (1, 3, 74, 106)
    assert torch.allclose(y[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-6)
    # at the border the transposed conv sees zero padding, interpolation clamps: they differ
    assert not torch.allclose(y[..., 0, :], ref[..., 0, :], atol=1e-3)


def test_checkpoint_round_trip(net, tmp_path):
    path = tmp_path / "model.pt"
    history = [{"epoch": 1, "train_loss": 1.5, "val_miou": 0.25}]
    save_checkpoint(path, net, {"history": history, "train_crop": [64, 96]})
    model, meta = load_checkpoint(path)
    assert not model.training
    for k, v in net.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert meta["history"] == history and meta["train_crop"] == [64, 96]
    assert meta["num_classes"] == 21 and meta["classes"] == list(VOC_CLASSES)
    assert meta["colormap"] == [list(c) for c in VOC_COLORMAP]
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["fcn_deploy_version"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind


def test_chapter_state_dict_loads(tmp_path):
    torch.manual_seed(2)
    chapter = chapter_net().eval()
    path = tmp_path / "net.params"
    torch.save(chapter.state_dict(), path)
    model, meta = load_checkpoint(path)
    assert meta["num_classes"] == 21 and meta["history"] == []
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), chapter(x))


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"net": chapter_net()}, path)  # a whole module: loading it would run pickle code
    with pytest.raises(CheckpointError, match="refus") as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)


def test_truncated_checkpoint(net, tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, net)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        load_checkpoint(empty)


def test_random_bytes_are_never_a_checkpoint(tmp_path):
    """Issue 24 (13): torch's legacy unpickler raised IndexError or KeyError on some random files
    (seeds 17 and 62 of these), which escaped as a traceback; every one is a CheckpointError naming the file."""
    import numpy as np

    for seed in range(80):
        bad = tmp_path / f"random{seed}.pt"
        bad.write_bytes(np.random.default_rng(seed).bytes(500))
        with pytest.raises(CheckpointError, match=f"random{seed}.pt"):
            load_checkpoint(bad)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_wrong_class_count(tmp_path):
    path = tmp_path / "five.pt"
    save_checkpoint(path, FCN(num_classes=5))
    with pytest.raises(CheckpointError, match="5 classes, expected 21"):
        load_checkpoint(path, num_classes=21)
    model, meta = load_checkpoint(path)  # without an expectation it loads as a 5-class FCN
    assert meta["num_classes"] == 5 and model.final_conv.out_channels == 5


def test_wrong_architecture(net, tmp_path):
    state = dict(net.state_dict())
    state["4.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)  # a layer of another shape
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not fit the FCN"):
        load_checkpoint(path)
    del state["4.0.conv1.weight"]  # a missing layer
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="does not fit the FCN"):
        load_checkpoint(path)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)  # not an FCN at all
    with pytest.raises(CheckpointError, match="is a ResNet-18 classifier state dict .* not a d2l FCN checkpoint: "
                                              "it can start a training .*--backbone-weights"):
        read_checkpoint(path)


def test_backbone_weights_from_file(tmp_path):
    torch.manual_seed(3)
    trunk = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(trunk.state_dict(), path)
    model = FCN(backbone_weights=path)
    assert torch.equal(model[0].weight, trunk.conv1.weight)  # child "0" is the trunk's conv1
    with pytest.raises(ArtifactNotFoundError, match="--backbone-weights"):
        FCN(backbone_weights=tmp_path / "absent.pth")


def test_random_bytes_and_onnx_are_not_pytorch_checkpoints(tmp_path, onnx_path, recwarn, capfd):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 8)
    for path in (junk, onnx_path):
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(path)
        message = str(exc.value)
        assert str(path) in message and "not a PyTorch checkpoint" in message
        assert "refuses to execute" not in message  # the security wording is for refused globals only
    assert not [w for w in recwarn if "torch" in str(w.filename)]  # no torch warning before the error
    assert capfd.readouterr().err == ""


def test_save_checkpoint_beyond_a_file_size_limit_is_one_line(tmp_path):
    """torch.save's own write failure is a RuntimeError ("unexpected pos"); serialised first, the
    write fails with an OSError (EFBIG) that becomes an OutputWriteError. A child process has
    RLIMIT_FSIZE with SIGXFSZ ignored."""
    import os
    import resource
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        from fcn_deploy.errors import OutputWriteError
        from fcn_deploy.model import FCN, save_checkpoint
        try:
            save_checkpoint({str(tmp_path / "m.pt")!r}, FCN(num_classes=2))
        except OutputWriteError as exc:
            print("ERROR", exc)
    """)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, preexec_fn=limit,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ERROR cannot write ") and "m.pt" in res.stdout, res.stdout
    assert os.listdir(tmp_path) == []
