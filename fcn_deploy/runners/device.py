"""Device strings: the one parser of ``--device`` (:func:`parse_device`, one error type:
:class:`~fcn_deploy.errors.UsageError`) and ``--device auto`` (:func:`resolve_device`: CUDA when
a GPU and the backend's GPU runtime are present, else CPU).

:func:`resolve_device` is the one place this is decided (:func:`~fcn_deploy.runners.open_runner` and the commands
call it); in a command it says what it chose on stderr, e.g. ``device: cuda:0 (NVIDIA H200)`` or
``device: cpu (no CUDA GPU)`` (library calls stay silent: :func:`announce_devices`). Explicit ``cpu`` / ``cuda`` / ``cuda:N`` are only normalised:
a runner that cannot use the requested GPU says so when it is activated.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

from fcn_deploy.errors import UsageError


#: Values ``--device`` accepts (``cuda:N`` besides).
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def parse_device(device: str | int) -> str:
    """Accept ``cpu``, ``cuda``, ``cuda:N`` or a GPU index N; return ``cpu`` or ``cuda:N``
    (``cuda`` is GPU 0). The one parser of a device string: anything else is a
    :class:`~fcn_deploy.errors.UsageError` naming ``--device``.

    ``auto`` is resolved per backend by :func:`resolve_device`.
    """
    if isinstance(device, int) and not isinstance(device, bool):
        if device >= 0:
            return f"cuda:{device}"
    else:
        text = str(device).strip().lower()
        if text == "cpu":
            return text
        if text == "cuda":
            return "cuda:0"
        if text.startswith("cuda:") and text[5:].isdigit():
            return f"cuda:{int(text[5:])}"
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")


def is_cuda(device: str) -> bool:
    """True for a CUDA device string (``cuda``, ``cuda:N``)."""
    return parse_device(device) != "cpu"


def device_index(device: str | int) -> int:
    """The GPU index of a CUDA device (``cuda`` is 0); :class:`UsageError` for ``cpu``."""
    parsed = parse_device(device)
    if parsed == "cpu":
        raise UsageError("--device cpu has no GPU index")
    return int(parsed[5:])


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cuda_gpu() -> tuple[bool, str]:
    """(whether torch sees a CUDA GPU, its name or the reason it does not)."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return True, torch.cuda.get_device_name(0)
    except Exception as exc:  # a CUDA build of torch without a usable driver
        return False, f"no CUDA GPU: {type(exc).__name__}"
    return False, "no CUDA GPU"


def ort_cuda_provider() -> tuple[bool, str]:
    """(whether onnxruntime has the CUDA execution provider, the reason when not)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return True, ""
    return False, f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (pip install onnxruntime-gpu)"


def gpu_runtime(backend: str) -> str:
    """Which GPU runtime a backend needs: ``trt`` (always a GPU), ``ort`` or ``torch``."""
    if backend.startswith("trt"):
        return "trt"
    if backend.startswith("ort"):
        return "ort"
    return "torch"


#: Where :func:`resolve_device` announces its choice when no ``echo`` is passed: nowhere in the
#: library (a Python caller's stdout and stderr stay its own); the CLI turns it on for a command
#: (:func:`announce_devices`, stderr).
_announce: Callable[[str], None] | None = None
_DEFAULT = object()


@contextlib.contextmanager
def announce_devices(echo: Callable[[str], None] | None = _stderr) -> Iterator[None]:
    """Within the block, :func:`resolve_device` without ``echo`` says what ``auto`` chose to
    ``echo`` (stderr by default): what every ``fcn-deploy`` command does."""
    global _announce
    previous, _announce = _announce, echo
    try:
        yield
    finally:
        _announce = previous


def resolve_device(backend: str, requested: str = "auto", *, echo: Any = _DEFAULT) -> str:
    """The device ``backend`` runs on for ``--device requested``: ``cpu`` or ``cuda:N``.

    ``auto``: ``cuda:0`` when a CUDA GPU is visible and the backend's GPU runtime is present
    (torch: a CUDA build of torch; ``ort*``: onnxruntime-gpu's CUDAExecutionProvider;
    ``trt*``: always, TensorRT needs a GPU), else ``cpu``; the choice goes to ``echo`` as one
    line (default: nowhere, or stderr inside :func:`announce_devices`, as in the CLI), except for ``trt*`` on a machine without a GPU,
    where the runner's one-line error says so (no "device: cuda:0" before it). Anything else: ``cpu``, ``cuda`` (GPU 0) or
    ``cuda:N``, returned normalised, no check (activation checks).

    Raises:
        UsageError: ``requested`` is none of these.
    """
    if echo is _DEFAULT:
        echo = _announce
    value = str(requested).strip().lower()
    if value != "auto":
        return parse_device(value)
    runtime = gpu_runtime(backend)
    gpu, name = cuda_gpu()
    if runtime == "trt":
        if not gpu:  # nothing to announce: activating the runner says, in one line, that there is no GPU
            return "cuda:0"
        device, why = "cuda:0", name
    elif not gpu:
        device, why = "cpu", name
    elif runtime == "ort":
        has_ep, reason = ort_cuda_provider()
        device, why = ("cuda:0", name) if has_ep else ("cpu", reason)
    else:
        device, why = "cuda:0", name
    if echo is not None:
        echo(f"device: {device} ({why})")
    return device
