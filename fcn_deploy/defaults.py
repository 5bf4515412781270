"""The model's constants and the default paths of the artifact chain, in one place that imports
nothing (pure data): the VOC class names and colormap, the void label, ImageNet normalisation, the
deployment tile, and where ``train``, ``export`` and ``build-engine`` put their outputs.

Every artifact records the constants it was made with (:mod:`fcn_deploy.artifacts`); these are
the defaults of a new model.
"""

from __future__ import annotations

from pathlib import Path

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

#: Default checkpoint (the ``torch`` backend's artifact and the root of the chain,
#: :mod:`fcn_deploy.chain`).
DEFAULT_CHECKPOINT = Path("model.pt")
#: Default export folder and the fp32 ONNX's name in it.
DEFAULT_EXPORT_DIR = Path("export")
ONNX_NAME = "fcn.onnx"
#: Default folder of TensorRT engines.
DEFAULT_ENGINES_DIR = Path("engines")
