"""The chapter's training loop for the FCN on a VOC-format dataset (``fcn-deploy train``).

As in d2l's ``train_ch13``: plain SGD (no momentum) with learning rate 0.001 and weight decay
1e-3, batches of 32 random 320x480 crops with ``drop_last``, and the loss of a batch is the *sum
over its images* of each image's mean per-pixel cross-entropy, so a learning rate means what it
means in the chapter. Unlike the chapter, void pixels (255) are ignored: each image's mean runs
over its non-void pixels only.

After every epoch the model is evaluated on the whole ``val`` images (not random crops as in the
chapter: whole images are deterministic, cover every pixel, include images smaller than the crop
and match deployment, which covers whole images). Each image is padded at the bottom/right to
multiples of 32 (with zeros after normalisation, i.e. the mean colour) and the logits are cropped
back. Then the checkpoint (``fcn_deploy.model.save_checkpoint``, meta ``history`` and
``train_crop``) and the history file ``<output stem>.history.json`` beside it are written
atomically, so Ctrl-C leaves the last complete epoch's checkpoint intact.

``resume`` continues from the checkpoint's last epoch up to ``epochs`` in total. Plain SGD has
no optimizer state, and every epoch's shuffling and crops are seeded from (seed, epoch), so on
the CPU a resumed run gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from fcn_deploy.errors import ArtifactNotFoundError, BackendUnavailableError, UsageError
from fcn_deploy.fileio import check_output_file, write_json_atomic
from fcn_deploy.outpaths import check_distinct_paths
from fcn_deploy.metrics import ConfusionMatrix
from fcn_deploy.defaults import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, TILE_HW, VOC_CLASSES
from fcn_deploy.voc import VOCSegDataset, check_samples

#: The FCN's total stride: the network's input sides must be multiples of it.
STRIDE = 32


def parse_hw(text: str, option: str = "--crop") -> tuple[int, int]:
    """Parse ``"HxW"`` (e.g. ``"320x480"``) into positive multiples of 32 (height, width)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text or "")
    if not m:
        raise UsageError(f"{option} must look like HxW, e.g. 320x480; got {text!r}")
    return check_hw((int(m.group(1)), int(m.group(2))), option)


def check_hw(hw: tuple[int, int], option: str = "--crop") -> tuple[int, int]:
    """Return ``hw`` as ints if both sides are positive multiples of 32, else raise UsageError."""
    h, w = (int(v) for v in hw)
    if h <= 0 or w <= 0 or h % STRIDE or w % STRIDE:
        raise UsageError(
            f"{option} {h}x{w}: height and width must be positive multiples of {STRIDE} "
            "(the FCN's output matches its input only then), e.g. 320x480"
        )
    return h, w


def history_path(output: str | os.PathLike) -> Path:
    """Where the training history goes: ``model.pt`` -> ``model.history.json``."""
    return Path(output).with_suffix(".history.json")


def resolve_device(device: str):
    """``auto`` (CUDA when usable, else CPU), ``cpu``, ``cuda`` or ``cuda:N`` -> torch.device."""
    import torch

    try:
        has_cuda = torch.cuda.is_available()
    except Exception:  # a CUDA build on a machine without driver
        has_cuda = False
    if device == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", device or ""):
        if not has_cuda:
            raise BackendUnavailableError(
                f"--device {device}: no usable CUDA GPU here (torch.cuda.is_available() is "
                "False); use --device cpu"
            )
        return torch.device(device)
    raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")


def per_image_loss(logits, target):
    """(N,) float32: each image's mean cross-entropy over its non-void pixels.

    ``logits`` float32 (N, K, H, W), ``target`` int64 (N, H, W) with 255 ignored; an image with
    no valid pixel contributes 0.
    """
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (target != IGNORE_INDEX).sum((1, 2)).clamp(min=1)
    return ce.sum((1, 2)) / valid


def predict_whole(model, image):
    """Logits (1, K, H, W) of one normalised image (1, 3, H, W) of any size: zero-padded at the
    bottom/right to multiples of 32, the logits cropped back."""
    import torch.nn.functional as F

    h, w = image.shape[-2:]
    padded = F.pad(image, (0, -w % STRIDE, 0, -h % STRIDE))
    return model(padded)[..., :h, :w]


def evaluate(model, dataset: VOCSegDataset, device, num_workers: int = 0,
             progress: bool = False) -> ConfusionMatrix:
    """Confusion matrix of ``model`` (set to eval mode) over ``dataset``'s whole images."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    model.eval()
    cm = ConfusionMatrix(model.num_classes, ignore_index=IGNORE_INDEX)
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers)
    with torch.no_grad():
        for x, y in tqdm(loader, desc="val", unit="img", disable=not progress, leave=False):
            pred = predict_whole(model, x.to(device)).argmax(1)
            cm.update(y, pred)
    return cm


def train_epoch(model, loader, optimizer, device, bar) -> tuple[float, int, int, int]:
    """One pass of SGD over ``loader``'s (float32 (N, 3, h, w), int64 (N, h, w)) batches.

    Returns (summed per-image loss, images, correct non-void pixels, non-void pixels); advances
    the tqdm ``bar`` by the images of each batch.
    """
    import torch

    model.train()
    loss_sum, images, correct, counted = 0.0, 0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = per_image_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # summed over the batch's images, as in the chapter
        optimizer.step()
        with torch.no_grad():
            valid = y != IGNORE_INDEX
            correct += int(((logits.argmax(1) == y) & valid).sum())
            counted += int(valid.sum())
        loss_sum += float(loss.detach().sum())
        images += x.shape[0]
        bar.update(x.shape[0])
        bar.set_postfix(loss=f"{loss_sum / images:.4f}")
    return loss_sum, images, correct, counted


def _log(progress: bool, message: str) -> None:
    if progress:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def _build_model(resume: bool, output: Path, backbone_weights, pretrained: bool, seed: int):
    """(model, history) either from the checkpoint at ``output`` or freshly initialised."""
    import torch

    from fcn_deploy.model import FCN, hub_resnet18_path, load_checkpoint

    if resume:
        model, meta = load_checkpoint(output, num_classes=len(VOC_CLASSES))
        return model, list(meta.get("history") or [])
    torch.manual_seed(seed)
    weights = hub_resnet18_path() if pretrained else backbone_weights
    return FCN(len(VOC_CLASSES), backbone_weights=weights), []


def train(voc_root: str | os.PathLike, output: str | os.PathLike, *, epochs: int = 5,
          lr: float = 0.001, weight_decay: float = 1e-3, batch_size: int = 32,
          crop_hw: tuple[int, int] = TILE_HW, device: str = "auto", resume: bool = False,
          backbone_weights: str | os.PathLike | None = None, pretrained: bool = False,
          num_workers: int = 0, seed: int = 0, force: bool = False,
          max_train_images: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Train the FCN on ``voc_root``'s ``train`` split, evaluating on ``val`` after every epoch.

    Writes the checkpoint ``output`` and ``history_path(output)`` after every epoch and returns
    the history: one dict per epoch with ``epoch``, ``train_loss``, ``train_pixel_acc``,
    ``val_pixel_acc``, ``val_class_acc``, ``val_miou``, ``images_per_s`` (training images per
    second), ``train_seconds``, ``val_seconds``, ``lr``, ``weight_decay``, ``batch_size``,
    ``train_images`` and ``device``. ``epochs`` is the total, resumed epochs included;
    ``max_train_images`` keeps the first N usable training images (quick runs).
    """
    import torch
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from fcn_deploy.model import save_checkpoint

    crop = check_hw(crop_hw)
    for name, value, low in (("--epochs", epochs, 1), ("--batch-size", batch_size, 1),
                             ("--num-workers", num_workers, 0)):
        if value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    if not lr > 0 or not weight_decay >= 0:
        raise UsageError(f"--lr must be > 0 and --weight-decay >= 0, got {lr} and {weight_decay}")
    if max_train_images is not None and max_train_images < 1:
        raise UsageError(f"--max-train-images must be at least 1, got {max_train_images}")
    output, hist_file = Path(output), history_path(output)
    check_distinct_paths({"-o": output, "its history": hist_file}, {"--backbone-weights": backbone_weights})
    if resume:
        if backbone_weights is not None or pretrained:
            raise UsageError("--resume continues from the checkpoint's weights; drop "
                             "--backbone-weights / --pretrained")
        if not output.is_file():
            raise ArtifactNotFoundError(f"--resume: checkpoint {output} not found; train without --resume first")
    else:
        if backbone_weights is not None and pretrained:
            raise UsageError("give either --backbone-weights PATH or --pretrained, not both")
        check_output_file(output, force, "-o")
        check_output_file(hist_file, force, "-o")
    dev = resolve_device(device)

    train_ds = VOCSegDataset(voc_root, "train", crop, IMAGENET_MEAN, IMAGENET_STD)
    val_ds = VOCSegDataset(voc_root, "val", None, IMAGENET_MEAN, IMAGENET_STD)
    train_set = train_ds if max_train_images is None else Subset(
        train_ds, range(min(max_train_images, len(train_ds))))
    model, history = _build_model(resume, output, backbone_weights, pretrained, seed)
    if len(history) >= epochs:
        _log(progress, f"{output} has {len(history)} epochs already; nothing to do")
        return TrainHistory(history, trained=0)
    # what would otherwise fail only after the first epoch: a bad label or image, a full disk
    check_samples(val_ds.samples)  # decoded after every epoch: every label decoded now
    used = train_ds.samples if max_train_images is None else train_ds.samples[:len(train_set)]
    check_samples(used, decode_labels=False)  # decoded as cropped: headers and sizes now
    check_output_space(output, _checkpoint_bytes(model))
    _log(progress, f"read {len(train_set)} training examples ({train_ds.num_filtered} smaller "
                   f"than the crop {crop[0]}x{crop[1]} skipped), {len(val_ds)} validation images")
    model.to(dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    bs = min(batch_size, len(train_set))
    trained = 0
    for epoch in range(len(history), epochs):
        epoch_seed = seed * 1_000_003 + epoch
        torch.manual_seed(epoch_seed)  # crops drawn in this process (num_workers=0)
        loader = DataLoader(train_set, batch_size=bs, shuffle=True, drop_last=True,
                            num_workers=num_workers, pin_memory=dev.type == "cuda",
                            generator=torch.Generator().manual_seed(epoch_seed))
        start = time.perf_counter()
        with tqdm(total=len(loader) * bs, unit="img", desc=f"epoch {epoch + 1}/{epochs}",
                  disable=not progress, leave=False) as bar:
            loss_sum, images, correct, counted = train_epoch(model, loader, optimizer, dev, bar)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        val = evaluate(model, val_ds, dev, num_workers, progress).compute()
        entry = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / images,
            "train_pixel_acc": correct / counted if counted else None,
            "val_pixel_acc": _finite(val.pixel_acc),
            "val_class_acc": _finite(val.class_acc),
            "val_miou": _finite(val.miou),
            "images_per_s": images / train_seconds,
            "train_seconds": train_seconds,
            "val_seconds": time.perf_counter() - start,
            "lr": lr, "weight_decay": weight_decay, "batch_size": bs,
            "train_images": images, "device": str(dev),
        }
        history.append(entry)
        save_checkpoint(output, model, {"train_crop": list(crop), "history": history})
        write_json_atomic(hist_file, {"checkpoint": output.name, "train_crop": list(crop),
                                      "history": history})
        _log(progress, _summary(entry, epochs))
        trained += 1
    return TrainHistory(history, trained=trained)


class TrainHistory(list):
    """The history :func:`train` returns (a list of per-epoch dicts), with :attr:`trained`: how
    many epochs this call ran (0 when a resumed checkpoint had them all already)."""

    def __init__(self, entries, trained: int) -> None:
        super().__init__(entries)
        self.trained = trained


def _checkpoint_bytes(model) -> int:
    """Bytes of the model's float tensors: about what one checkpoint takes on disk."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


#: Probe written beside ``-o`` before training (and removed): the folder takes a write.
PROBE_BYTES = 1 << 16


def check_output_space(output: Path, need: int) -> None:
    """Refuse, before the first epoch, an ``-o`` whose disk cannot take a checkpoint of about
    ``need`` bytes (:class:`~fcn_deploy.errors.DiskFullError`), or whose folder refuses a probe
    write (:class:`~fcn_deploy.errors.OutputWriteError`); creates no folder, leaves nothing."""
    import shutil
    import tempfile

    from fcn_deploy.errors import DiskFullError
    from fcn_deploy.fileio import write_error

    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{output.name}.", suffix=".probe") as probe:
            probe.write(b"\0" * PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise write_error(output, exc) from None
    free = shutil.disk_usage(folder).free
    if free < need + PROBE_BYTES:
        raise DiskFullError(f"-o {output}: {free / 2**20:.1f} MiB free on its disk, a checkpoint needs "
                            f"{need / 2**20:.1f} MiB; free some space or choose another -o")


def _finite(v: float) -> float | None:
    return None if math.isnan(v) else v


def _summary(e: dict[str, Any], epochs: int) -> str:
    def fmt(v):  # the history keeps fractions (0..1); printed in percent, as evaluate prints
        return "n/a" if v is None else f"{100 * v:.2f}%"

    return (f"epoch {e['epoch']}/{epochs}: loss {e['train_loss']:.4f}, train pixel acc "
            f"{fmt(e['train_pixel_acc'])}, val acc {fmt(e['val_pixel_acc'])}, val mIoU "
            f"{fmt(e['val_miou'])}, {e['images_per_s']:.1f} img/s")
