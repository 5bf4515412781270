"""Writing export artifacts: the output check of ``-o``, the ONNX file and its sidecar (one
atomic pair), the exporters' silence and package versions recorded in the metadata. Shared by the
fp32 export (:mod:`~fcn_deploy.export.torch_export`), FP16 (:mod:`~fcn_deploy.export.fp16`) and
INT8 (:mod:`~fcn_deploy.export.int8`)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from fcn_deploy.artifacts import sidecar_path
from fcn_deploy.errors import UsageError
from fcn_deploy.fileio import atomic_path, check_output_file, write_json_atomic


def check_outputs(output: str | os.PathLike, force: bool) -> tuple[Path, Path]:
    """(ONNX path, sidecar path), refusing an existing one without ``force`` or a non-.onnx name."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise UsageError(f"output {output} must end in .onnx (its sidecar is <stem>.json)")
    return check_output_file(output, force, "-o"), check_output_file(sidecar_path(output), force)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and log records."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def write_artifact(proto, meta: dict[str, Any], output: Path, sidecar: Path) -> None:
    """Save ``proto`` as one self-contained file (no external data) and its sidecar, atomically."""
    import onnx

    with atomic_path(output) as tmp:
        onnx.save_model(proto, tmp, save_as_external_data=False)
        write_json_atomic(sidecar, meta)


def package_version(package: str) -> str:
    from importlib.metadata import version

    return version(package)

