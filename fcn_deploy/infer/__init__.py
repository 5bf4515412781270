"""Tiled inference of whole images: ``fcn-deploy infer`` and the building blocks it shares
with ``evaluate``, ``bench --images`` and ``serve``.

* :mod:`~fcn_deploy.infer.segmenter`: :class:`Segmenter`, one runner plus the tile assembler:
  any image size in, (H, W) uint8 class ids (and optionally averaged logits) out;
* :mod:`~fcn_deploy.infer.pipeline`: :func:`run_inference`, the threaded pipeline over many
  files (decode, cut, engine, stitch, write), and its :class:`InferSummary`;
* :mod:`~fcn_deploy.infer.inputs`: which files are inputs and where their outputs go;
* :mod:`~fcn_deploy.infer.outputs`: what is written per image (palette PNG mask, overlay, logits);
* :mod:`~fcn_deploy.infer.gpu_decode`: ``--decode gpu`` (nvJPEG through torchvision);
* :mod:`~fcn_deploy.infer.limits`: the memory a batch may take;
* :mod:`~fcn_deploy.infer.ray`: ``infer --ray``, the same per-image work on a Ray cluster.

The public face is re-exported here: ``from fcn_deploy.infer import run_inference, Segmenter``.
"""

from fcn_deploy.infer.inputs import InputImage, collect_inputs, find_images
from fcn_deploy.infer.pipeline import ImageRecord, InferSummary, run_inference
from fcn_deploy.infer.segmenter import Segmenter

__all__ = ["ImageRecord", "InferSummary", "InputImage", "Segmenter", "collect_inputs", "find_images", "run_inference"]
