"""TensorRT flavours: full TensorRT 10/11 (``tensorrt``) and TensorRT-RTX (``tensorrt_rtx``).

Everything that differs between the two Python packages lives in :class:`TrtFlavour`; the rest of
:mod:`fcn_deploy.trt` is written once against the API they share. Also here: the TensorRT logger
that keeps errors for our one-line messages, and :func:`gc_paused` (TensorRT-RTX deadlocks when the
garbage collector runs inside one of its callbacks).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator

from fcn_deploy.errors import BackendUnavailableError, UsageError

log = logging.getLogger(__name__)

#: numpy dtype name of each TensorRT ``DataType`` member name (types numpy lacks are absent).
TRT_TO_NUMPY = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TrtFlavour:
    """One TensorRT Python package and what it can do; the only place the two APIs differ.

    Attributes:
        name: ``"tensorrt"`` or ``"rtx"`` (the ``--trt`` value and the sidecar's flavour).
        modules: import names of the Python bindings, tried in order (TensorRT-RTX has shipped
            them as ``tensorrt_rtx`` and as ``tensorrt_rtx_bindings``).
        label: human name used in messages.
        tag: file-name prefix before the version (``trt-10.13.0``, ``trt-rtx-1.7.1``).
        extra: the pip extra that installs it.
        portable: builds ahead of time on the CPU for a set of compute capabilities
            (TensorRT-RTX); otherwise the engine is built on, and only runs on, the GPU at hand.
        supports_timing_cache: honours ``IBuilderConfig.set_timing_cache`` (TensorRT-RTX turned
            timing-cache calls into no-ops in 1.2).
    """

    name: str
    modules: tuple[str, ...]
    label: str
    tag: str
    extra: str
    portable: bool
    supports_timing_cache: bool

    @property
    def needs_gpu_to_build(self) -> bool:
        return not self.portable

    @property
    def install_hint(self) -> str:
        return f"pip install 'fcn-deploy[{self.extra}]'"

    def load(self) -> ModuleType:
        """Import the bindings (first of :attr:`modules` that loads); :class:`BackendUnavailableError`
        with the install line if none does."""
        errors = []
        for module in self.modules:
            try:
                return importlib.import_module(module)
            except (ImportError, OSError) as exc:
                errors.append(str(exc))
        raise BackendUnavailableError(
            f"{self.label} is not installed or does not load ({'; '.join(errors)}); {self.install_hint}"
        )

    def default_targets(self, trt: ModuleType) -> list[str]:
        """Compute capabilities ("8.6", ...) a default ahead-of-time build covers; [] if not portable.

        TensorRT-RTX documents its default targets as Ampere and later; Turing (SM75) only when
        asked for explicitly. The list is read from the installed ``ComputeCapability`` enum.
        """
        if not self.portable:
            return []
        names = [n for n in trt.ComputeCapability.__members__ if re.fullmatch(r"SM\d{2,3}", n)]
        return [f"{n[2:-1]}.{n[-1]}" for n in names if n != "SM75"]


FLAVOURS: dict[str, TrtFlavour] = {
    "tensorrt": TrtFlavour("tensorrt", ("tensorrt",), "TensorRT", "trt", "trt", False, True),
    "rtx": TrtFlavour(
        "rtx", ("tensorrt_rtx", "tensorrt_rtx_bindings"), "TensorRT-RTX", "trt-rtx", "rtx", True, False
    ),
}


def resolve_flavour(choice: str = "auto") -> tuple[TrtFlavour, ModuleType]:
    """``"auto"`` prefers full TensorRT when importable, else TensorRT-RTX; returns (flavour, module)."""
    if choice == "auto":
        for flavour in FLAVOURS.values():
            try:
                return flavour, flavour.load()
            except BackendUnavailableError:
                continue
        raise BackendUnavailableError(
            "neither TensorRT nor TensorRT-RTX is installed: "
            f"{FLAVOURS['tensorrt'].install_hint} (builds on an NVIDIA GPU) or "
            f"{FLAVOURS['rtx'].install_hint} (builds portable engines, no GPU needed)"
        )
    if choice not in FLAVOURS:
        raise UsageError(f"--trt must be auto, tensorrt or rtx, not {choice!r}")
    flavour = FLAVOURS[choice]
    return flavour, flavour.load()


def short_version(version: str) -> str:
    """``"10.13.0.35"`` -> ``"10.13.0"`` (the part shown in file names)."""
    return ".".join(version.split(".")[:3])


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect garbage first, then keep Python's cyclic collector off while TensorRT runs
    (a context manager, also usable as a decorator: ``@gc_paused()``).

    TensorRT calls back into Python (the logger) while it holds internal locks. A collection
    triggered inside such a callback can free a builder left over from an earlier build, whose
    destructor waits on that same lock: seen as a deadlock inside ``createInferBuilder`` on
    TensorRT-RTX 1.7 when a failed build's objects were still waiting for the collector.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def collecting_logger(trt: ModuleType):
    """A TensorRT ``ILogger`` that keeps errors (in ``.errors``, for our one-line messages) and
    forwards warnings to :mod:`logging`. ``.take()`` returns the errors so far joined on one line
    (``"no error reported"`` when there are none) and forgets them."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(" ".join(str(msg).split()))
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("%s", msg)

        def take(self) -> str:
            text = " | ".join(self.errors) or "no error reported"
            self.errors = []
            return text

    return _Logger()
