"""Metadata that every artifact (ONNX, FP16 ONNX, engine) carries, and where it lives.

The metadata is one JSON-serialisable dict, stored twice with identical content:

* in the ONNX ``metadata_props`` under the key :data:`META_KEY` (``"fcn_deploy"``), as JSON;
* in a sidecar ``<stem>.json`` beside the artifact (``export/fcn.onnx`` -> ``export/fcn.json``,
  ``export/fcn.fp16.onnx`` -> ``export/fcn.fp16.json``).

Keys::

    classes, colormap     class names (K,) and RGB colours (K, 3)
    mean, std             ImageNet normalisation applied to RGB in [0, 1]
    tile_hw               [height, width] of the tiles the artifact takes
    num_classes           K
    precision             "fp32" or "fp16" (compute precision; IO stays float32)
    io                    {"inputs": [{"name", "shape", "dtype"}], "outputs": [...]}; ``shape`` is a
                          list of ints where -1 marks the dynamic batch dimension (named "batch" in
                          the ONNX graph), ``dtype`` a numpy dtype name ("float32")
    parent                {"path": absolute path, "sha256": hex} of the artifact it was made from
                          (the checkpoint for fp32, the fp32 ONNX for fp16); compare the sha256 to
                          detect a stale artifact, the path is informative
    opset                 default-domain ONNX opset
    exporter              tools and versions that produced the graph
    keep_fp32             node names left in float32 (fp16 artifacts only)
    verification          metrics measured when the artifact was written, or None (--no-verify)
    fcn_deploy_version    version of fcn-deploy that wrote it
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fcn_deploy import __version__
from fcn_deploy.errors import ArtifactMetadataError, ArtifactNotFoundError, ArtifactReadError, first_line
from fcn_deploy.fileio import sha256_file

#: ``metadata_props`` key holding the metadata as JSON.
META_KEY = "fcn_deploy"

#: ONNX TensorProto element types we expect at the model boundary -> numpy names.
_ONNX_DTYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 2: "uint8"}


def sidecar_path(artifact: str | os.PathLike) -> Path:
    """The JSON sidecar of an artifact: same folder and stem, suffix ``.json``."""
    return Path(artifact).with_suffix(".json")


def parent_ref(path: str | os.PathLike) -> dict[str, str]:
    """``{"path", "sha256"}`` of the file an artifact was made from."""
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": sha256_file(path)}


def checkpoint_artifact_meta(
    checkpoint_meta: dict[str, Any], *, tile_hw: tuple[int, int], parent: dict[str, str]
) -> dict[str, Any]:
    """Artifact metadata inherited from a checkpoint's ``meta`` (see :mod:`fcn_deploy.model`).

    The caller adds the graph-dependent keys (precision, io, opset, exporter, verification).
    """
    return {
        "classes": list(checkpoint_meta["classes"]),
        "colormap": [list(map(int, c)) for c in checkpoint_meta["colormap"]],
        "mean": [float(v) for v in checkpoint_meta["mean"]],
        "std": [float(v) for v in checkpoint_meta["std"]],
        "tile_hw": [int(tile_hw[0]), int(tile_hw[1])],
        "num_classes": int(checkpoint_meta["num_classes"]),
        "parent": dict(parent),
        "fcn_deploy_version": __version__,
    }


def onnx_io(model) -> dict[str, list[dict[str, Any]]]:
    """``io`` entry of the metadata, read from an ``onnx.ModelProto``'s graph inputs/outputs.

    A dimension with a symbolic name (``dim_param``) or no value is reported as -1.
    """

    def spec(value_info) -> dict[str, Any]:
        tensor_type = value_info.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        dtype = _ONNX_DTYPES.get(tensor_type.elem_type, f"onnx_type_{tensor_type.elem_type}")
        return {"name": value_info.name, "shape": shape, "dtype": dtype}

    initializers = {t.name for t in model.graph.initializer}
    return {
        "inputs": [spec(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [spec(v) for v in model.graph.output],
    }


def embed_meta(model, meta: dict[str, Any]) -> None:
    """Store ``meta`` as JSON in ``model.metadata_props[META_KEY]`` (replacing any previous)."""
    for prop in [p for p in model.metadata_props if p.key == META_KEY]:
        model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)


def check_normalization(meta: dict[str, Any], source: str, required: bool = False) -> dict[str, Any]:
    """Refuse metadata whose ``mean`` / ``std`` cannot normalise an image: each must be a list of
    3 finite numbers, ``std`` all > 0 (a zero std makes every pixel inf, clipped to 255 by nothing
    downstream). :class:`~fcn_deploy.errors.ArtifactMetadataError` names ``source`` (the file) and
    the key. ``required``: a missing key is refused too. Returns ``meta``."""
    if not isinstance(meta, dict):
        raise ArtifactMetadataError(f"{source}: fcn-deploy metadata is a {type(meta).__name__}, not an object")
    for key in ("mean", "std"):
        if key not in meta:
            if required:
                raise ArtifactMetadataError(f"{source}: metadata has no '{key}' (3 numbers); re-export it")
            continue
        value = meta[key]
        numbers = isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not numbers or (key == "std" and min(value) <= 0):
            what = "3 finite numbers > 0" if key == "std" else "3 finite numbers"
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ArtifactMetadataError(f"{source}: metadata '{key}' must be {what}, got {shown}; re-export it")
    return meta


def meta_from_model(model, source: str = "model") -> dict[str, Any]:
    """The metadata dict embedded in an ``onnx.ModelProto`` (``source`` names it in errors);
    its ``mean`` / ``std`` checked by :func:`check_normalization`."""
    for prop in model.metadata_props:
        if prop.key == META_KEY:
            try:
                meta = json.loads(prop.value)
            except json.JSONDecodeError as exc:
                raise ArtifactReadError(f"{source}: metadata '{META_KEY}' is not valid JSON ({exc})") from None
            return check_normalization(meta, source)
    raise ArtifactReadError(
        f"{source} carries no fcn-deploy metadata (metadata_props['{META_KEY}']); "
        "export it with `fcn-deploy export`"
    )


def read_artifact_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of an artifact: from an ``.onnx`` file's ``metadata_props`` or a ``.json`` sidecar.

    Raises :class:`ArtifactNotFoundError` when the file is absent and :class:`ArtifactReadError` when it
    is not an fcn-deploy ONNX / sidecar.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(f"artifact {path} not found")
    if path.suffix == ".json":
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactReadError(f"{path} is not a JSON metadata sidecar ({exc})") from None
        if not isinstance(meta, dict) or "tile_hw" not in meta:
            raise ArtifactReadError(f"{path} is not an fcn-deploy metadata sidecar")
        return check_normalization(meta, str(path))
    return meta_from_model(load_onnx(path), str(path))


def load_onnx(path: str | os.PathLike):
    """``onnx.load`` with a missing or unparsable file, or missing or escaping external data
    (``onnx.checker.ValidationError``), mapped to a one-line :class:`ArtifactReadError`."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(f"ONNX file {path} not found")
    try:
        return onnx.load(path)
    except (DecodeError, ValueError, OSError, RuntimeError, onnx.checker.ValidationError) as exc:
        raise ArtifactReadError(f"{path} is not a readable ONNX model ({first_line(exc)})") from None
