"""Pascal VOC: class names, colormap, normalisation constants.

(The VOC-format reader and the synthetic writer are added below by the data module work.)
"""

from __future__ import annotations

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "potted plant",
    "sheep", "sofa", "train", "tv/monitor",
)

VOC_COLORMAP: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128),
    (0, 128, 128), (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0),
    (64, 0, 128), (192, 0, 128), (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0),
    (0, 192, 0), (128, 192, 0), (0, 64, 128),
)

#: Label value of VOC's object borders: ignored by the loss and by every metric.
IGNORE_INDEX = 255
#: Colour VOC uses for void pixels in its palette PNGs.
VOID_COLOR = (224, 224, 192)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The deployment tile (height, width); both are multiples of 32.
TILE_HW: tuple[int, int] = (320, 480)


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
