"""Import onnxruntime, or say in one line which of the two distributions to install.

fcn-deploy depends on exactly one onnxruntime distribution, chosen by extra: ``cpu``
(``onnxruntime``) or ``gpu`` (``onnxruntime-gpu``); both install the same ``onnxruntime`` module,
so they must never be installed together (docs/architecture.md, "Installing").
"""

from __future__ import annotations

from types import ModuleType

from fcn_deploy.errors import BackendUnavailableError

#: One-line install hint: exactly one of the two distributions.
ORT_INSTALL_HINT = "pip install 'fcn-deploy[cpu]' (onnxruntime) or 'fcn-deploy[gpu]' (onnxruntime-gpu)"


def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module; :class:`BackendUnavailableError` naming both extras when absent."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(f"onnxruntime is not installed ({exc}); {ORT_INSTALL_HINT}") from None
    return onnxruntime
