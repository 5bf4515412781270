"""Pascal VOC: the palette, the VOC-format reader and a synthetic VOC-format writer (the class
names, colormap and normalisation constants live in :mod:`fcn_deploy.defaults`).

Layout read and written (``VOCdevkit/VOC2012``)::

    JPEGImages/<name>.jpg               RGB photos
    SegmentationClass/<name>.png        palette PNG labels: class ids, 255 = void (object borders)
    ImageSets/Segmentation/{train,val,trainval}.txt   one name per line

Importing this module does not import torch (the pure numpy modules use its constants);
:class:`VOCSegDataset` imports it when it makes tensors.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from fcn_deploy.errors import ArtifactExistsError, DatasetError, ImageReadError, UsageError
from fcn_deploy.fileio import atomic_path, write_bytes_atomic
from fcn_deploy.defaults import (  # the model's constants; re-exported: fcn_deploy.voc.VOC_CLASSES works
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TILE_HW,
    VOC_CLASSES,
    VOC_COLORMAP,
    VOID_COLOR,
)
from fcn_deploy.images import load_rgb, normalize



def voc_palette() -> list[int]:
    """A 768-entry PIL palette: class ``i`` gets ``VOC_COLORMAP[i]``, 255 gets the void colour,
    everything else black."""
    pal = [0] * 768
    for i, rgb in enumerate(VOC_COLORMAP):
        pal[3 * i: 3 * i + 3] = rgb
    pal[3 * IGNORE_INDEX: 3 * IGNORE_INDEX + 3] = VOID_COLOR
    return pal


def colormap_array(colormap=VOC_COLORMAP) -> np.ndarray:
    """(K, 3) uint8 array of class colours."""
    return np.asarray(colormap, dtype=np.uint8).reshape(-1, 3)


# --- VOC-format reader ------------------------------------------------------------------------

@dataclass(frozen=True)
class VOCSample:
    """One entry of a split file: its name and the paths of its JPEG photo and PNG label."""

    name: str
    image_path: Path
    label_path: Path


def resolve_voc_root(voc_root: str | os.PathLike) -> Path:
    """Return the ``VOC2012`` folder for ``voc_root``.

    Accepts the VOC2012 folder itself or a folder holding ``VOCdevkit/VOC2012`` or ``VOC2012``
    (what ``fcn-deploy synth-voc DIR`` and the VOC tarball create).
    """
    root = Path(voc_root)
    if not root.is_dir():
        raise DatasetError(f"VOC root {root} not found (expected a VOCdevkit/VOC2012 folder)")
    for cand in (root, root / "VOCdevkit" / "VOC2012", root / "VOC2012"):
        if (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    raise DatasetError(
        f"{root} is not a VOC2012 folder: no ImageSets/Segmentation in it "
        "(expected JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{train,val}.txt)"
    )


def list_split(voc_root: str | os.PathLike, split: str) -> list[VOCSample]:
    """The samples named in ``ImageSets/Segmentation/<split>.txt``, in file order.

    Raises :class:`DatasetError` naming the file for a missing root or split file, an empty
    split, a missing JPEG or an image without its label PNG.
    """
    root = resolve_voc_root(voc_root)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    try:
        names = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise DatasetError(f"split file {split_file} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read split file {split_file}: {exc}") from None
    if not names:
        raise DatasetError(f"split file {split_file} lists no images")
    samples = []
    for name in names:
        sample = VOCSample(name, root / "JPEGImages" / f"{name}.jpg",
                           root / "SegmentationClass" / f"{name}.png")
        if not sample.image_path.is_file():
            raise DatasetError(f"{sample.image_path} listed in {split_file} not found")
        if not sample.label_path.is_file():
            raise DatasetError(f"image {sample.image_path} has no label: {sample.label_path} not found")
        samples.append(sample)
    return samples


def _rgb_to_index(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 colours -> (H, W) uint8 class ids through the VOC colormap (the chapter's
    ``voc_label_indices``); the void colour and every unknown colour become 255."""
    code = (rgb[..., 0].astype(np.int32) * 256 + rgb[..., 1]) * 256 + rgb[..., 2]
    return _colour_lut()[code]


@functools.lru_cache(maxsize=1)
def _colour_lut() -> np.ndarray:
    """(256**3,) uint8: class id of every 24-bit colour (255 for non-VOC colours)."""
    lut = np.full(256 ** 3, IGNORE_INDEX, dtype=np.uint8)
    for i, (r, g, b) in enumerate(VOC_COLORMAP):
        lut[(r * 256 + g) * 256 + b] = i
    return lut


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as (H, W) uint8 class ids, 255 (void) kept.

    Palette (``P``) and grayscale (``L``) PNGs hold the ids themselves; RGB(A) PNGs are mapped
    through :data:`VOC_COLORMAP` (void and unknown colours -> 255).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("P", "L"):
                return np.asarray(img, dtype=np.uint8).copy()
            if img.mode in ("RGB", "RGBA", "RGBX"):
                return _rgb_to_index(np.asarray(img.convert("RGB"), dtype=np.uint8))
            raise DatasetError(f"label {path} has unsupported PNG mode {img.mode} "
                               "(expected palette, grayscale or RGB)")
    except FileNotFoundError:
        raise DatasetError(f"label {path} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"label {path} is unreadable ({exc})") from None


def read_sample(sample: VOCSample) -> tuple[np.ndarray, np.ndarray]:
    """Decode one sample: ((H, W, 3) uint8 RGB, (H, W) uint8 label)."""
    rgb = load_rgb(sample.image_path)
    label = read_label(sample.label_path)
    if label.shape != rgb.shape[:2]:
        raise DatasetError(
            f"label {sample.label_path} is {label.shape[0]}x{label.shape[1]} but image "
            f"{sample.image_path} is {rgb.shape[0]}x{rgb.shape[1]} (HxW)"
        )
    return rgb, label


def check_samples(samples: Sequence[VOCSample], decode_labels: bool = True) -> None:
    """Check, before any work, that every sample's image header reads and its label decodes
    (``decode_labels``; else only its header) with the image's size; the first bad file raises
    a one-line :class:`~fcn_deploy.errors.DatasetError` / :class:`~fcn_deploy.errors.ImageReadError`
    naming it. What ``train`` runs on the val split before its first epoch."""
    for sample in samples:
        hw = image_hw(sample.image_path)
        if decode_labels:
            label_hw = read_label(sample.label_path).shape
        else:
            try:
                with Image.open(sample.label_path) as img:
                    label_hw = img.size[::-1]
            except FileNotFoundError:
                raise DatasetError(f"label {sample.label_path} not found") from None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise DatasetError(f"label {sample.label_path} is unreadable ({exc})") from None
        if tuple(label_hw) != tuple(hw):
            raise DatasetError(f"label {sample.label_path} is {label_hw[0]}x{label_hw[1]} but image "
                               f"{sample.image_path} is {hw[0]}x{hw[1]} (HxW)")


def image_hw(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image as displayed (EXIF rotation applied), from its header only."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable image ({exc})") from None
    return h, w


class VOCSegDataset:
    """The chapter's ``VOCSegDataset`` over a VOC2012 split, decoding lazily: a map-style
    dataset for ``torch.utils.data.DataLoader`` (duck-typed, so this module imports no torch).

    With ``crop_hw`` (h, w), images smaller than the crop are dropped as in the chapter
    (:attr:`num_filtered` counts them) and each item is the same random crop of image and
    label; with ``crop_hw=None`` items are whole images (evaluation, batch size 1).

    Items: (float32 tensor (3, h, w), ImageNet-normalised RGB; int64 tensor (h, w) class ids,
    255 = ignore). Label values >= ``num_classes`` other than 255 become 255 too.
    """

    def __init__(self, voc_root: str | os.PathLike, split: str,
                 crop_hw: tuple[int, int] | None = TILE_HW,
                 mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD,
                 num_classes: int = len(VOC_CLASSES)) -> None:
        samples = list_split(voc_root, split)
        self.crop_hw = None if crop_hw is None else (int(crop_hw[0]), int(crop_hw[1]))
        self.mean, self.std, self.num_classes = mean, std, num_classes
        if self.crop_hw is None:
            self.samples = samples
        else:
            ch, cw = self.crop_hw
            sizes = [image_hw(s.image_path) for s in samples]
            self.samples = [s for s, (h, w) in zip(samples, sizes) if h >= ch and w >= cw]
            if not self.samples:
                max_h, max_w = max(h for h, _ in sizes), max(w for _, w in sizes)
                raise DatasetError(
                    f"no image of split '{split}' in {resolve_voc_root(voc_root)} is as large as "
                    f"the crop {ch}x{cw} (HxW): the {len(sizes)} images are at most "
                    f"{max_h} high and {max_w} wide; choose a smaller crop"
                )
        #: How many images of the split were dropped for being smaller than the crop.
        self.num_filtered = len(samples) - len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        import torch

        rgb, label = read_sample(self.samples[index])
        if self.crop_hw is not None:
            (ch, cw), (h, w) = self.crop_hw, label.shape
            top = int(torch.randint(0, h - ch + 1, ()).item())
            left = int(torch.randint(0, w - cw + 1, ()).item())
            rgb = rgb[top:top + ch, left:left + cw]
            label = label[top:top + ch, left:left + cw]
        target = label.astype(np.int64)
        target[(target >= self.num_classes) & (target != IGNORE_INDEX)] = IGNORE_INDEX
        return torch.from_numpy(normalize(rgb, self.mean, self.std)), torch.from_numpy(target)


# --- synthetic VOC-format writer ----------------------------------------------------------------

#: (height, width) of the synthetic photos, cycled: exactly the tile, odd, typical VOC landscape,
#: smaller than the tile, larger, portrait (narrower than the tile), wider. Seven sizes so that
#: every fourth image (the validation ones) still meets all of them.
SYNTH_SIZES: tuple[tuple[int, int], ...] = (
    (320, 480), (333, 517), (375, 500), (241, 307), (400, 560), (500, 375), (352, 488),
)

#: Object classes of the synthetic set: class id -> (RGB base colour, texture). Textures are
#: ("stripes", angle in degrees, period in px) or ("checker", 0, period in px).
SYNTH_CLASSES: dict[int, tuple[tuple[int, int, int], tuple[str, float, float]]] = {
    1: ((170, 195, 235), ("stripes", 0.0, 6.0)),     # aeroplane: pale blue, vertical stripes
    3: ((230, 205, 40), ("stripes", 45.0, 9.0)),     # bird: yellow, diagonal stripes
    7: ((205, 35, 35), ("stripes", 90.0, 5.0)),      # car: red, horizontal stripes
    8: ((235, 130, 40), ("checker", 0.0, 10.0)),     # cat: orange, checkerboard
    12: ((145, 60, 175), ("stripes", -45.0, 7.0)),   # dog: purple, anti-diagonal stripes
    15: ((40, 170, 70), ("checker", 0.0, 6.0)),      # person: green, fine checkerboard
}

#: Width in px of the void (255) band drawn centred on every object boundary.
SYNTH_VOID_WIDTH = 5


# Mutation testing skips the drawing helpers below (pragma): any change to a random range or a
# texture gives another valid synthetic picture; the contract (sizes, classes, void bands around
# objects, determinism) is tested on synth_sample's output. See docs/testing.md.
# pragma: no mutate start
def _shape_points(rng: np.random.Generator, h: int, w: int) -> list[tuple[float, float]]:
    """Vertices (x, y) of a random ellipse (as a 48-gon), rotated rectangle or star polygon."""
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    rx, ry = rng.uniform(0.08, 0.25) * w, rng.uniform(0.08, 0.25) * h
    kind = rng.integers(3)
    if kind == 0:  # ellipse
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        xs, ys = rx * np.cos(t), ry * np.sin(t)
    elif kind == 1:  # rectangle, rotated
        xs, ys = np.array([-rx, rx, rx, -rx]), np.array([-ry, -ry, ry, ry])
    else:  # star-shaped polygon with 3 to 8 vertices
        n = int(rng.integers(3, 9))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.5, 1.0, n)
        xs, ys = rx * r * np.cos(t), ry * r * np.sin(t)
    a = rng.uniform(0, math.pi) if kind != 0 or rng.random() < 0.5 else 0.0
    ca, sa = math.cos(a), math.sin(a)
    return [(float(cx + x * ca - y * sa), float(cy + x * sa + y * ca)) for x, y in zip(xs, ys)]


def _texture(cls: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 class-specific colour and texture, colour jittered per object."""
    (colour, (kind, angle, period)) = SYNTH_CLASSES[cls]
    base = np.asarray(colour, np.float32) + rng.uniform(-15, 15, 3).astype(np.float32)
    if kind == "stripes":
        a = math.radians(angle)
        pattern = np.sin((xx * math.cos(a) + yy * math.sin(a)) * (2 * math.pi / period))
    else:
        pattern = np.where(((xx // period + yy // period) % 2) == 0, 1.0, -1.0).astype(np.float32)
    return base + 35.0 * pattern[..., None]


def _background(h: int, w: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 muted background: a colour gradient plus low-frequency waves."""
    base = rng.uniform(80, 160, 3).astype(np.float32)
    gy, gx = rng.uniform(-40, 40, 3).astype(np.float32), rng.uniform(-40, 40, 3).astype(np.float32)
    img = base + gy * (yy / h - 0.5)[..., None] + gx * (xx / w - 0.5)[..., None]
    for _ in range(2):
        a, period = rng.uniform(0, math.pi), rng.uniform(60, 150)
        wave = np.sin((xx * math.cos(a) + yy * math.sin(a)) * (2 * math.pi / period) + rng.uniform(0, 6.3))
        img += rng.uniform(5, 15) * wave[..., None]
    return img


# pragma: no mutate end


def synth_sample(index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic photo and its label: ((H, W, 3) uint8 RGB, (H, W) uint8 ids with 255 void
    bands around objects); its size is ``SYNTH_SIZES[index % 7]``."""
    h, w = SYNTH_SIZES[index % len(SYNTH_SIZES)]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = _background(h, w, yy, xx, rng)
    label = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(label)
    classes = list(SYNTH_CLASSES)
    for _ in range(int(rng.integers(1, 5))):
        cls = classes[int(rng.integers(len(classes)))]
        pts = _shape_points(rng, h, w)
        mask_img = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask_img).polygon(pts, fill=1)
        mask = np.asarray(mask_img, dtype=bool)
        img[mask] = _texture(cls, yy, xx, rng)[mask]
        draw.polygon(pts, fill=cls)
        draw.line(pts + [pts[0]], fill=IGNORE_INDEX, width=SYNTH_VOID_WIDTH, joint="curve")
    img += rng.normal(0.0, 8.0, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), np.asarray(label, dtype=np.uint8).copy()


def write_synthetic_voc(root: str | os.PathLike, num_images: int = 24, seed: int = 0,
                        val_fraction: float = 0.25, *, force: bool = False) -> Path:
    """Write a synthetic VOC-format dataset under ``root/VOCdevkit/VOC2012`` and return that folder.

    ``num_images`` JPEG photos of the sizes :data:`SYNTH_SIZES` (cycled) with 1 to 4 textured
    objects of the classes :data:`SYNTH_CLASSES`, palette PNG labels with void bands, and the
    split files (every ``1 / val_fraction``-th image goes to val). Deterministic for a seed.
    An existing dataset there is refused unless ``force``.
    """
    if num_images < 2:
        raise UsageError(f"--num-images must be at least 2 (one train, one val image), got {num_images}")
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in (0, 1), got {val_fraction}")
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    if not force and ((sets / "train.txt").exists() or any((voc / "JPEGImages").glob("*.jpg"))):
        raise ArtifactExistsError(f"{voc} already holds a dataset; pass --force to overwrite it")
    rng = np.random.default_rng(seed)
    palette = voc_palette()
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for i in range(num_images):
        name = f"synth_{i:05d}"
        rgb, label = synth_sample(i, rng)
        with atomic_path(voc / "JPEGImages" / f"{name}.jpg") as tmp:
            Image.fromarray(rgb, "RGB").save(tmp, format="JPEG", quality=90)
        png = Image.fromarray(label, "P")
        png.putpalette(palette)
        with atomic_path(voc / "SegmentationClass" / f"{name}.png") as tmp:
            png.save(tmp, format="PNG")
        is_val = math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)
        splits["val" if is_val else "train"].append(name)
    if not splits["val"]:
        splits["val"].append(splits["train"].pop())
    splits["trainval"] = sorted(splits["train"] + splits["val"])
    for split, names in splits.items():
        write_bytes_atomic(sets / f"{split}.txt", ("\n".join(names) + "\n").encode())
    return voc
