"""Verification of an export against its parent, with the parity metrics and thresholds of
``check`` (:mod:`fcn_deploy.parity.metrics`, :data:`fcn_deploy.parity.thresholds.DEFAULT_THRESHOLDS`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fcn_deploy.errors import ExportError, VerificationError, first_line
from fcn_deploy.export.graph import INPUT_NAME, OUTPUT_NAME

# -- verification -----------------------------------------------------------------------------
def verification_plan(batch: int | None) -> tuple[int, int]:
    """(number of tiles, run batch): 3 tiles in batches of 2 and 1 for a dynamic batch (both
    sizes exercised), else one batch of the fixed size."""
    return (3, 2) if batch is None else (batch, batch)


def verification_tiles(
    n: int, height: int, width: int, mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> np.ndarray:
    """``n`` normalised float32 tiles (n, 3, height, width): tile 0 uniform RGB noise, the others
    smooth image-like noise (random 1/16-resolution colours, bilinearly upsampled)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rgb = np.empty((n, height, width, 3), dtype=np.float32)
    for i in range(n):
        if i == 0:
            rgb[i] = rng.random((height, width, 3), dtype=np.float32)
        else:
            small = rng.integers(0, 256, (max(height // 16, 1), max(width // 16, 1), 3), dtype=np.uint8)
            big = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
            rgb[i] = np.asarray(big, dtype=np.float32) / 255.0
    tiles = (rgb - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))


def run_onnx(model, tiles: np.ndarray, batch: int) -> np.ndarray:
    """Run an ONNX model (``ModelProto``) on onnxruntime CPU in batches of ``batch``;
    returns the ``logits`` (N, K, H, W) as float32."""
    from fcn_deploy.runners.ortimport import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        out = [session.run([OUTPUT_NAME], {INPUT_NAME: tiles[i:i + batch]})[0] for i in range(0, len(tiles), batch)]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"onnxruntime {ort.__version__} cannot run the model: {first_line(exc)}") from None
    return np.concatenate(out).astype(np.float32)


def verify_logits(reference: np.ndarray, candidate: np.ndarray, *, what: str, precision: str) -> dict[str, Any]:
    """:func:`~fcn_deploy.parity.metrics.compare_logits` of two (N, K, H, W) logit arrays, checked
    against ``check``'s default limits for ``precision`` (and no non-finite logits); raise
    :class:`VerificationError` naming every metric beyond its limit and by how much."""
    from fcn_deploy.parity.metrics import compare_logits
    from fcn_deploy.parity.thresholds import DEFAULT_THRESHOLDS, apply_thresholds

    metrics = compare_logits(reference, candidate)
    failed = [o.message for o in apply_thresholds(what, precision, metrics, DEFAULT_THRESHOLDS) if not o.passed]
    if failed:
        raise VerificationError("verification failed: " + "; ".join(failed))
    return metrics


def verify_onnx(model, torch_model, tiles: np.ndarray, *, batch: int = 2) -> dict[str, Any]:
    """onnxruntime (CPU) run of ``model`` against the float32 PyTorch ``torch_model`` on ``tiles``
    (float32 (N, 3, H, W)); raise :class:`VerificationError` beyond the fp32 thresholds."""
    import torch

    with torch.inference_mode():
        reference = np.concatenate(
            [torch_model(torch.from_numpy(tiles[i:i + batch])).numpy() for i in range(0, len(tiles), batch)]
        )
    return verify_logits(reference, run_onnx(model, tiles, batch), what="ONNX fp32 vs PyTorch fp32", precision="fp32")
