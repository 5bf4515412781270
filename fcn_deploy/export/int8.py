"""INT8: a calibrated QDQ ONNX (``<stem>.int8.onnx``) made from the fp32 export.

``export_int8("export/fcn.onnx", voc_root=...)`` writes ``export/fcn.int8.onnx`` and its sidecar
``export/fcn.int8.json`` with :func:`onnxruntime.quantization.quantize_static`:

* QDQ format (QuantizeLinear/DequantizeLinear pairs around float ops): the form both onnxruntime
  (whose CPU provider fuses DQ -> Conv -> Q into QLinearConv at graph optimisation level "all")
  and TensorRT's explicit quantization (TensorRT 11 has no implicit INT8 / calibrators) take.
* symmetric signed int8 activations and weights (``ActivationSymmetric``/``WeightSymmetric``,
  QInt8 both): TensorRT quantization is symmetric only. Conv weights per output channel; biases
  float32 (TensorRT-RTX refuses onnxruntime's int32 bias DequantizeLinear).
* the ConvTranspose (the 64x64 bilinear upsampling, the last node) stays float32: TensorRT has no
  per-output-channel quantization for ConvTranspose, and onnxruntime had an axis bug for it. It
  takes the dequantized output of the quantized 1x1 classifier conv and writes float32 ``logits``.
* IO stays float32: ``image`` float32 (N, 3, H, W) in, ``logits`` float32 (N, K, H, W) out.

``export_int8(..., cpu_only=True)`` (``export --int8-cpu``) writes ``<stem>.int8-cpu.onnx``
instead: the same calibration with uint8 activations and zero points, which onnxruntime's CPU
provider fuses into QLinearConv everywhere; TensorRT refuses it (``ort-int8-cpu`` only).

Calibration tiles are cut from real images by :func:`fcn_deploy.parity.draw_tiles` (the way
``check`` draws them), from image files/folders (``calib``) or the *train* split of a VOC root
(``voc_root``; ``check --voc-root`` uses the val split, so calibration and parity tiles differ).
:class:`TileCalibrationReader` hands those tiles, and only those, to the calibrator.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fcn_deploy.artifacts import embed_meta, load_onnx, meta_from_model, onnx_io, parent_ref, sidecar_path
from fcn_deploy.chain import int8_cpu_onnx_path, int8_onnx_path
from fcn_deploy.errors import ArtifactNotFoundError, DatasetError, ExportError, UsageError, first_line
from fcn_deploy.export.writing import check_outputs, write_artifact

__all__ = [
    "CALIB_METHODS", "DEFAULT_CALIB_TILES", "MIN_CALIB_TILES", "Int8Report", "TileCalibrationReader",
    "calibration_tiles", "check_int8_args", "export_int8", "quantize_qdq", "verify_int8",
]

#: ``--calib-method`` -> onnxruntime ``CalibrationMethod`` member name. Note: through
#: ``quantize_static`` onnxruntime 1.32's Entropy calibrator runs with 128 histogram bins and 128
#: quantized bins (no extra option reaches them), so its KL search has one candidate, the full
#: range: it gave exactly the MinMax scales (48 of 48 tensors, measured) -- use percentile to clip.
CALIB_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
#: Default number of calibration tiles (see README "INT8" for the measurements behind it).
DEFAULT_CALIB_TILES = 32
#: Fewest calibration tiles accepted. MinMax scales are maxima over the tiles, so a few tiles
#: (one or two images) miss the tails of the activation ranges, and the 2048-bin histograms of
#: entropy / percentile are mostly empty. 8 tiles (1.2 M pixels of 320x480) is the fewest measured:
#: on the demo model minmax / percentile on 8 tiles kept 99.69 / 99.71% argmax agreement and moved
#: mIoU vs labels by +0.62 / +0.13 points, inside the proposed int8 gate (README "INT8").
MIN_CALIB_TILES = 8
#: Tiles per calibration batch for a dynamic-batch ONNX (a fixed batch uses its own size).
CALIB_BATCH = 4
#: Percentile kept by ``--calib-method percentile`` (onnxruntime's default, 99.999).
PERCENTILE = 99.999


@dataclass
class Int8Report:
    """What :func:`export_int8` wrote: paths and the embedded metadata (``meta["calibration"]``
    holds method, tiles, their source and files, and the parent ONNX's sha256)."""

    path: Path
    sidecar_path: Path
    meta: dict[str, Any]

    def summary(self) -> str:
        """Two lines for the CLI: what was written, and how it was calibrated."""
        cal = self.meta["calibration"]
        size = self.path.stat().st_size / 2**20
        kind = "int8 QDQ" if cal.get("symmetric", True) else "int8 QDQ, uint8 activations, onnxruntime CPU only"
        lines = [f"wrote {self.path} ({size:.1f} MiB, {kind}, opset {self.meta['opset']}) and {self.sidecar_path.name}"]
        line = (f"  calibrated ({cal['method']}) on {cal['tiles']} tiles from {cal['images']} images of "
                f"{cal['source']['kind']} {cal['source']['path']}")
        v = self.meta.get("verification")
        if v:
            line += (f"; verified against ONNX fp32 on {v['tiles']} of them (int8 limits): argmax "
                     f"agreement {v['agreement']:.4f}%, max abs {v['max_abs']:.3g}")
        lines.append(line)
        return "\n".join(lines)


def check_int8_args(
    onnx_output: str | os.PathLike,
    *,
    int8: bool,
    calib: Sequence[str | os.PathLike] | None,
    voc_root: str | os.PathLike | None,
    calib_tiles: int,
    force: bool,
    int8_cpu: bool = False,
) -> None:
    """The checks of ``export --int8`` / ``--int8-cpu`` that need no model, run before the fp32
    export starts: calibration options only with one of them, exactly one source, enough tiles,
    writable outputs."""
    given = [n for n, v in (("--calib", calib), ("--voc-root", voc_root)) if v]
    if not (int8 or int8_cpu):
        if given:
            raise UsageError(f"{given[0]} only applies with --int8 or --int8-cpu")
        return
    if calib_tiles < MIN_CALIB_TILES:
        raise UsageError(f"--calib-tiles {calib_tiles}: calibration needs at least {MIN_CALIB_TILES} tiles")
    if len(given) != 1:
        raise UsageError("--int8 calibrates on real images: give --calib PATHS or --voc-root DIR (one of them)")
    for flag, path in ((int8, int8_onnx_path(onnx_output)), (int8_cpu, int8_cpu_onnx_path(onnx_output))):
        if flag:
            check_outputs(path, force)


# -- calibration data ------------------------------------------------------------------------
def calibration_tiles(
    tile_hw: tuple[int, int],
    *,
    calib: Sequence[str | os.PathLike] | None = None,
    voc_root: str | os.PathLike | None = None,
    tiles: int = DEFAULT_CALIB_TILES,
):
    """Draw calibration tiles from exactly one source; returns (TileSet, source dict, files).

    ``calib``: image files and folders (searched recursively, as ``infer`` does); ``voc_root``:
    the *train* split of a VOC-format dataset. Tiles are cut by
    :func:`fcn_deploy.parity.draw_tiles`: up to ``tiles`` non-overlapping grid tiles spread evenly
    over the images (reflect-padded where an image is smaller than a tile). Fewer than
    :data:`MIN_CALIB_TILES` requested or drawn is a :class:`UsageError`.
    """
    from fcn_deploy.parity.tiles import draw_tiles

    if tiles < MIN_CALIB_TILES:
        raise UsageError(f"--calib-tiles {tiles}: calibration needs at least {MIN_CALIB_TILES} tiles")
    if (calib is None or len(calib) == 0) == (voc_root is None):
        raise UsageError("int8 calibration needs real images: give --calib PATHS or --voc-root DIR (one of them)")
    if voc_root is not None:
        from fcn_deploy.voc import list_split, read_sample

        samples = [(s.name, s) for s in list_split(voc_root, "train")]
        load, source = read_sample, {"kind": "voc", "path": str(voc_root), "split": "train"}
        files = {s.name: str(s.image_path) for _, s in samples}
    else:
        from fcn_deploy.images import load_rgb
        from fcn_deploy.infer.inputs import find_images

        missing = [str(p) for p in calib if not Path(p).exists()]
        if missing:
            raise UsageError(f"--calib {missing[0]}: no such file or folder")
        paths = find_images(list(calib))
        if not paths:
            raise UsageError(f"--calib {' '.join(map(str, calib))}: no images found")
        samples = [(str(p), p) for p in paths]
        files = {str(p): str(p) for p in paths}
        source = {"kind": "images", "path": " ".join(str(p) for p in calib)}

        def load(path):
            return load_rgb(path), None  # an unreadable image is an error: calibration must be exact

    tileset = draw_tiles(samples, load, tuple(tile_hw), tiles)
    if len(tileset) < MIN_CALIB_TILES:
        raise DatasetError(
            f"{source['path']}: only {len(tileset)} calibration tiles of {tile_hw[0]}x{tile_hw[1]} "
            f"in {tileset.images} images; need at least {MIN_CALIB_TILES}"
        )
    used = sorted({name.rsplit("@", 1)[0] for name in tileset.names})
    return tileset, source, [files[u] for u in used]


class TileCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a fixed set of uint8 tiles.

    Args:
        rgb: (N, 3, H, W) uint8 RGB tiles (a :class:`~fcn_deploy.parity.TileSet`'s ``rgb``).
        mean, std: the artifact's normalisation (RGB in [0, 1]).
        input_name: the ONNX input.
        batch: tiles per batch.
        fixed: the ONNX batch is fixed at ``batch``: a short last batch is filled up with the
            first tiles again (no other data).

    Each :meth:`get_next` returns ``{input_name: float32 (b, 3, H, W)}`` normalised tiles, then
    None; :attr:`served` counts the tiles handed out, :attr:`served_ids` which ones.
    """

    def __init__(self, rgb: np.ndarray, mean, std, input_name: str, batch: int, fixed: bool = False) -> None:
        if rgb.ndim != 4 or rgb.shape[1] != 3 or rgb.dtype != np.uint8:
            raise UsageError(f"calibration tiles must be uint8 (N, 3, H, W), got {rgb.dtype} {rgb.shape}")
        self.rgb, self.mean, self.std = rgb, mean, std
        self.input_name, self.batch, self.fixed = input_name, int(batch), fixed
        self.served = 0
        self.served_ids: list[int] = []
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        from fcn_deploy.images import normalize

        n = len(self.rgb)
        if self._next >= n:
            return None
        ids = list(range(self._next, min(self._next + self.batch, n)))
        self._next += self.batch
        ids += list(range(self.batch - len(ids))) if len(ids) < self.batch and self.fixed else []
        self.served += len(ids)
        self.served_ids += ids
        batch = np.stack([normalize(self.rgb[i].transpose(1, 2, 0), self.mean, self.std) for i in ids])
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._next = 0

    # onnxruntime's CalibrationDataReader protocol also iterates
    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


# -- quantization ----------------------------------------------------------------------------
def _quant_versions(cpu_only: bool = False) -> str:
    import onnxruntime as ort

    kind = "QUInt8 activations/QInt8 weights" if cpu_only else "QInt8/QInt8 symmetric"
    return f"onnxruntime {ort.__version__} quantize_static(QDQ, {kind}, per-channel)"


def quantize_qdq(fp32_model, reader: TileCalibrationReader, *, method: str = "minmax",
                 preprocess: bool = False, symmetric_activations: bool = True,
                 workdir: str | os.PathLike | None = None):
    """Quantize an fp32 FCN ``onnx.ModelProto`` to QDQ int8 with the tiles ``reader`` serves;
    returns the quantized ``onnx.ModelProto`` (its metadata_props not yet updated).

    ``preprocess``: run ``quant_pre_process`` (symbolic shape inference and onnxruntime's basic
    optimisations) first, as onnxruntime recommends. Off by default: on this FCN export (batch
    norms already folded into the convs by the exporter) it gave the identical graph and scales
    and cost 4x the quantization time (measured 11.7 s vs 3.1 s, 8 tiles of 64x96). ConvTranspose nodes are not quantized; biases
    stay float32 (``QuantizeBias`` False): TensorRT(-RTX) refuses onnxruntime's int32 bias
    DequantizeLinear ("input has type Int32 but must have type FP8, FP4, Int4, Int8, or UInt8").

    ``symmetric_activations=False`` (uint8 activations with zero points; ``export --int8-cpu``):
    onnxruntime's CPU provider then folds every ReLU into the quantization and fuses all convs into
    QLinearConv, but TensorRT cannot build it. Symmetric int8 activations (the default) keep each
    ReLU between two QDQ pairs, which onnxruntime leaves unfused (see README "INT8").
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIB_METHODS:
        raise UsageError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, not {method!r}")
    extra = {
        "ActivationSymmetric": symmetric_activations,
        "WeightSymmetric": True,
        "QuantizeBias": False,
    }
    # No "CalibMaxIntermediateOutputs": onnxruntime 1.32's MinMax calibrator *discards* the
    # collected batches each time that many accumulate (and fails with "No data is collected" on
    # an exact multiple); MinMax keeps only per-batch min/max scalars anyway. The histogram
    # calibrators ignore the option and hold every batch's activations until the end (about
    # 30 MB per 320x480 tile), which bounds --calib-tiles in practice to a few hundred.
    if method == "percentile":
        extra["CalibPercentile"] = PERCENTILE
    with contextlib.ExitStack() as stack:
        tmp = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fcn-int8-")))
        src, pre, out = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "int8.onnx"
        onnx.save_model(fp32_model, src)
        if preprocess:
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            except Exception as exc:  # shape inference / optimiser failures of many types
                raise ExportError(f"quant_pre_process failed: {first_line(exc)}") from None
            src = pre
        model = onnx.load(str(src))
        exclude = [n.name for n in model.graph.node if n.op_type == "ConvTranspose"]
        reader.rewind()
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_static's logging.warning advice on pre-processing
        stack.callback(root.setLevel, level)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
                quantize_static(
                    str(src), str(out), reader, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=getattr(CalibrationMethod, CALIB_METHODS[method]),
                    nodes_to_exclude=exclude, extra_options=extra,
                )
        except Exception as exc:  # onnxruntime raises many types
            raise ExportError(f"onnxruntime quantize_static failed: {first_line(exc)}") from None
        return onnx.load(str(out)), exclude


def export_int8(
    onnx_path: str | os.PathLike = "export/fcn.onnx",
    output: str | os.PathLike | None = None,
    *,
    calib: Sequence[str | os.PathLike] | None = None,
    voc_root: str | os.PathLike | None = None,
    calib_tiles: int = DEFAULT_CALIB_TILES,
    calib_method: str = "minmax",
    preprocess: bool = False,
    verify: bool = True,
    force: bool = False,
    cpu_only: bool = False,
) -> Int8Report:
    """Write the calibrated QDQ int8 variant of an fp32 fcn-deploy ONNX and its sidecar.

    ``cpu_only``: the ``export --int8-cpu`` variant, ``<stem>.int8-cpu.onnx``: uint8 activations
    with zero points (weights still symmetric int8), which onnxruntime's CPU provider fuses into
    QLinearConv everywhere (21 of 21 convs vs 10 of 21, 1.7-2.8x onnxruntime fp32 measured on
    AVX-512 VNNI); TensorRT refuses non-zero zero points, so it is for ``ort-int8-cpu`` only.

    Args:
        onnx_path: the fp32 export (``precision`` "fp32" in its metadata).
        output: default ``<stem>.int8.onnx`` beside it (never the input itself).
        calib / voc_root: the calibration images (see :func:`calibration_tiles`).
        calib_tiles: tiles drawn (at least :data:`MIN_CALIB_TILES`).
        calib_method: ``minmax``, ``entropy`` or ``percentile``.
        verify: compare int8 with the fp32 ONNX (onnxruntime CPU) on up to 8 of the calibration
            tiles against ``check``'s int8 limits (:func:`verify_int8`); nothing is written when
            they fail.

    The metadata is the parent's with ``precision`` "int8", ``parent`` the fp32 ONNX and
    ``calibration`` = {method, tiles, images, source, files, parent_sha256, per_channel,
    symmetric, excluded}.
    """
    onnx_path = Path(onnx_path)
    default = int8_cpu_onnx_path if cpu_only else int8_onnx_path
    output = Path(output) if output is not None else default(onnx_path)
    if not onnx_path.is_file():
        raise ArtifactNotFoundError(f"ONNX {onnx_path} not found; run `fcn-deploy export` first")
    if output.resolve() == onnx_path.resolve() or sidecar_path(output).resolve() == sidecar_path(onnx_path).resolve():
        raise UsageError(f"output {output} would replace its input {onnx_path}")
    output, sidecar = check_outputs(output, force)
    if calib_method not in CALIB_METHODS:
        raise UsageError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, not {calib_method!r}")
    fp32 = load_onnx(onnx_path)
    meta = meta_from_model(fp32, str(onnx_path))
    if meta.get("precision") != "fp32":
        raise UsageError(f"{onnx_path} has precision {meta.get('precision')!r}; quantize the fp32 ONNX")
    tileset, source, files = calibration_tiles(meta["tile_hw"], calib=calib, voc_root=voc_root, tiles=calib_tiles)
    inp = meta["io"]["inputs"][0]
    fixed = inp["shape"][0] > 0
    reader = TileCalibrationReader(tileset.rgb, meta["mean"], meta["std"], inp["name"],
                                   inp["shape"][0] if fixed else CALIB_BATCH, fixed=fixed)
    parent = parent_ref(onnx_path)
    q, excluded = quantize_qdq(fp32, reader, method=calib_method, preprocess=preprocess,
                               symmetric_activations=not cpu_only)
    meta.update(
        precision="int8",
        parent=parent,
        exporter=f"{meta.get('exporter', 'unknown exporter')}; {_quant_versions(cpu_only)}",
        io=onnx_io(q),
        calibration={
            "method": calib_method,
            "tiles": len(tileset),
            "images": tileset.images,
            "source": source,
            "files": files,
            "parent_sha256": parent["sha256"],
            "per_channel": True,
            "symmetric": not cpu_only,
            "runtime": "onnxruntime CPU only (uint8 activations: TensorRT refuses non-zero zero points)"
            if cpu_only else "onnxruntime and TensorRT",
            "preprocess": bool(preprocess),
            "bias": "float32",
            "excluded": excluded,
        },
        verification=None,
    )
    if verify:
        meta["verification"] = verify_int8(q, fp32, reader, min(8, len(tileset)))
    embed_meta(q, meta)
    write_artifact(q, meta, output, sidecar)
    return Int8Report(output, sidecar, meta)


def verify_int8(q, fp32, reader: TileCalibrationReader, n: int) -> dict[str, Any]:
    """onnxruntime CPU run of the int8 model ``q`` against the fp32 model on the first ``n`` tiles
    ``reader`` holds, checked with ``check``'s int8 limits
    (:data:`~fcn_deploy.parity.thresholds.DEFAULT_THRESHOLDS`; no labels here, so argmax
    agreement and non-finite logits); raise :class:`VerificationError` naming the failed metric."""
    from fcn_deploy.export.verify import run_onnx, verify_logits
    from fcn_deploy.images import normalize

    tiles = np.stack([normalize(reader.rgb[i].transpose(1, 2, 0), reader.mean, reader.std) for i in range(n)])
    batch = reader.batch if reader.fixed else 2
    if reader.fixed and n % batch:
        tiles = np.concatenate([tiles, tiles[: batch - n % batch]])
    metrics = verify_logits(run_onnx(fp32, tiles, batch), run_onnx(q, tiles, batch),
                            what="ONNX int8 vs ONNX fp32", precision="int8")
    metrics["tiles_source"] = "calibration"
    return metrics
