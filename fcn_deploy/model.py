"""The d2l FCN (ResNet-18 trunk, 1x1 conv, bilinear-initialised transposed conv) and checkpoints.

Checkpoint format (``model.pt``, loaded with ``torch.load(weights_only=True)``)::

    {"format": "fcn-deploy-checkpoint", "format_version": 1,
     "state_dict": {name: tensor}, "meta": {...}}

``meta`` holds num_classes, classes, colormap, mean, std, train_crop, history,
fcn_deploy_version. A bare state dict of the chapter's ``net`` loads too.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcn_deploy import __version__
from fcn_deploy.errors import ArtifactNotFoundError, CheckpointError, first_line, shorten
from fcn_deploy.fileio import atomic_path
from fcn_deploy.defaults import IMAGENET_MEAN, IMAGENET_STD, TILE_HW, VOC_CLASSES, VOC_COLORMAP

CHECKPOINT_FORMAT = "fcn-deploy-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
#: File name torchvision gives the ImageNet ResNet-18 weights in its hub cache.
RESNET18_FILE = "resnet18-f37072fd.pth"


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> torch.Tensor:
    """The chapter's bilinear upsampling kernel.

    Returns a float32 tensor of shape (in_channels, out_channels, k, k) (the layout of a
    ``ConvTranspose2d`` weight) whose diagonal channel pairs hold the separable bilinear filter.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = (torch.arange(kernel_size).reshape(-1, 1), torch.arange(kernel_size).reshape(1, -1))
    filt = (1 - torch.abs(og[0] - center) / factor) * (1 - torch.abs(og[1] - center) / factor)
    weight = torch.zeros((in_channels, out_channels, kernel_size, kernel_size))
    idx = torch.arange(min(in_channels, out_channels))
    weight[idx, idx, :, :] = filt
    return weight


def default_meta(num_classes: int = len(VOC_CLASSES)) -> dict[str, Any]:
    """Metadata carried by every checkpoint and later artifact (VOC defaults)."""
    if num_classes == len(VOC_CLASSES):
        classes, colormap = list(VOC_CLASSES), [list(c) for c in VOC_COLORMAP]
    else:
        classes = [f"class_{i}" for i in range(num_classes)]
        colormap = [list(VOC_COLORMAP[i % len(VOC_COLORMAP)]) for i in range(num_classes)]
    return {
        "num_classes": num_classes,
        "classes": classes,
        "colormap": colormap,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "train_crop": list(TILE_HW),
        "history": [],
        "fcn_deploy_version": __version__,
    }


class FCN(nn.Sequential):
    """The chapter's ``net``: ResNet-18 without avgpool/fc, ``final_conv``, ``transpose_conv``.

    Input float32 (N, 3, H, W), ImageNet-normalised RGB; output logits float32
    (N, num_classes, H, W) for H and W multiples of 32. Being an ``nn.Sequential`` with the
    chapter's child names ("0".."7", "final_conv", "transpose_conv"), a state dict of the
    chapter's ``net`` loads as is.
    """

    def __init__(self, num_classes: int = len(VOC_CLASSES), backbone_weights: str | os.PathLike | None = None):
        import torchvision

        trunk = torchvision.models.resnet18(weights=None)
        if backbone_weights is not None:
            load_backbone_weights(trunk, backbone_weights)
        super().__init__(*list(trunk.children())[:-2])
        self.num_classes = num_classes
        self.add_module("final_conv", nn.Conv2d(512, num_classes, kernel_size=1))
        self.add_module(
            "transpose_conv",
            nn.ConvTranspose2d(num_classes, num_classes, kernel_size=64, padding=16, stride=32),
        )
        nn.init.xavier_uniform_(self.final_conv.weight)
        with torch.no_grad():
            self.transpose_conv.weight.copy_(bilinear_kernel(num_classes, num_classes, 64))


def hub_resnet18_path() -> Path:
    """Where torchvision caches the ImageNet ResNet-18 weights (``--pretrained`` reads it)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_FILE


def load_backbone_weights(trunk: nn.Module, path: str | os.PathLike) -> None:
    """Load torchvision ResNet-18 ImageNet weights from a local file into ``trunk``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(
            f"backbone weights {path} not found; there is no network here: download "
            f"https://download.pytorch.org/models/{RESNET18_FILE} elsewhere and copy it to "
            f"{hub_resnet18_path()} (for --pretrained) or pass its path with --backbone-weights"
        )
    state = _torch_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        trunk.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a torchvision ResNet-18 state dict: {first_line(exc)}") from None


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with every failure mapped to a one-line error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler wraps every failure in the same "Weights only load failed"
        # text; only "Unsupported global" means a real pickled object (code to run) was refused.
        if "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path} holds pickled Python objects, which fcn-deploy refuses to execute "
                "(torch.load weights_only=True); save a state dict instead"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (its bytes are no pickle torch.save writes)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint ({first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001: the legacy unpickler fails on random bytes with IndexError,
        # KeyError, struct.error, ... (1 file in 12 of random bytes): whatever it raises, the file is no checkpoint
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {first_line(exc)})") from None


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Write ``model``'s state dict and ``meta`` atomically to ``path``."""
    full_meta = default_meta(getattr(model, "num_classes", len(VOC_CLASSES)))
    full_meta.update(meta or {})
    full_meta["fcn_deploy_version"] = __version__
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": copy.deepcopy(full_meta),
    }
    buffer = io.BytesIO()  # serialised in memory: a failed write then raises OSError (errno), not
    torch.save(payload, buffer)  # torch's RuntimeError "unexpected pos"
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (state_dict, meta) from a checkpoint or a bare state dict, without building a model."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(f"checkpoint {path} not found")
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        state, meta = obj.get("state_dict"), dict(obj.get("meta") or {})
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, meta = obj, {}
    else:
        raise CheckpointError(f"{path} is neither an fcn-deploy checkpoint nor a state dict")
    if not isinstance(state, dict) or "final_conv.weight" not in state or "transpose_conv.weight" not in state:
        if isinstance(state, dict) and {"fc.weight", "layer4.1.conv2.weight"} <= set(state):
            raise CheckpointError(
                f"{path} is a ResNet-18 classifier state dict (ImageNet weights such as torchvision's), not a "
                f"d2l FCN checkpoint: it can start a training (fcn-deploy train --backbone-weights {path}); "
                "give the checkpoint `fcn-deploy train` wrote (model.pt)")
        raise CheckpointError(
            f"{path} is not a d2l FCN checkpoint (no final_conv / transpose_conv weights); give the "
            "checkpoint `fcn-deploy train` wrote (model.pt)"
        )
    num_classes = int(state["final_conv.weight"].shape[0])
    base = default_meta(num_classes)
    base.update(meta)
    if int(base["num_classes"]) != num_classes:
        raise CheckpointError(
            f"{path}: metadata says {base['num_classes']} classes but final_conv has {num_classes}"
        )
    return state, base


def load_checkpoint(
    path: str | os.PathLike, num_classes: int | None = None
) -> tuple[FCN, dict[str, Any]]:
    """Build an :class:`FCN` (eval mode, CPU) from ``path``; return (model, meta).

    ``num_classes``, when given, must match the checkpoint's.
    """
    state, meta = read_checkpoint(path)
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise CheckpointError(
            f"{path} has {meta['num_classes']} classes, expected {num_classes}"
        )
    model = FCN(num_classes=meta["num_classes"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path} does not fit the FCN architecture: {shorten(detail)}") from None
    model.eval()
    return model, meta
