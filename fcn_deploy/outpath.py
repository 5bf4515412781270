"""Check an output path before the work that produces it (export, check --report)."""

from __future__ import annotations

import os
from pathlib import Path

from fcn_deploy.errors import FcnDeployError
from fcn_deploy.fileio import check_writable


def writable_output(path: str | os.PathLike, force: bool) -> Path:
    """:func:`~fcn_deploy.fileio.check_writable`, plus: the nearest existing folder above ``path``
    is a folder this process may write in (so that ``-o afile/x.onnx`` or a read-only folder fails
    in one line before minutes of work, not after)."""
    path = check_writable(path, force)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise FcnDeployError(f"cannot write {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise FcnDeployError(f"cannot write {path}: no write permission in {parent}")
            break
    return path
