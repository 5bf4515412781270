"""The rule for a command's named file outputs (``-o``, ``--report``, ``--grid``, ...): no two
outputs of one command are the same file, and no output is one of its inputs.

Two paths name the same file when they are equal after resolving symlinks
(:func:`os.path.realpath`) or, both existing, share an inode (hard links: :func:`os.path.samefile`).
Checked up front, before any work, so nothing is written when the paths collide.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

from fcn_deploy.errors import UsageError

PathLike = Union[str, "os.PathLike[str]"]


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file (symlinks resolved; hard links by inode)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_distinct_paths(outputs: Mapping[str, Optional[PathLike]],
                         inputs: Mapping[str, Optional[PathLike]] | None = None) -> None:
    """Refuse (:class:`~fcn_deploy.errors.UsageError`, one line naming both options) two
    ``outputs`` that are the same file, and an output that is one of the ``inputs``.

    Args:
        outputs: option name (``"--report"``) -> path, or None when that output is not asked for.
        inputs: option or role name (``"the input ONNX"``) -> path, or None.
    """
    given = [(name, path) for name, path in outputs.items() if path is not None]
    for i, (name, path) in enumerate(given):
        for other, other_path in given[i + 1:]:
            if same_file(path, other_path):
                raise UsageError(f"{name} {path} and {other} {other_path} are the same file; "
                                 "give each output its own path")
    for name, path in given:
        for role, in_path in (inputs or {}).items():
            if in_path is not None and same_file(path, in_path):
                raise UsageError(f"{name} {path} is {role} {in_path}; an output never replaces an input, "
                                 "choose another path")
