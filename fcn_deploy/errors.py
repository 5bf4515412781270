"""Typed errors. Every expected failure raises a subclass of :class:`FcnDeployError`;
the CLI prints ``error: <message>`` on one line and exits with :attr:`exit_code`."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """First non-empty line of ``exc``'s message (at most ``limit`` characters), or its type name:
    what a one-line error may quote of a third-party exception."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


class FcnDeployError(Exception):
    """Root of every error this package raises on purpose (bad input, missing artifact, ...)."""

    exit_code = 2


class UsageError(FcnDeployError):
    """An option or argument has a value that cannot work (e.g. a height not divisible by 32)."""


class ArtifactExistsError(FcnDeployError):
    """An output exists already and ``--force`` was not given."""


class ArtifactNotFoundError(FcnDeployError):
    """A model, ONNX or engine file the command needs is absent."""


class CheckpointError(FcnDeployError):
    """A checkpoint is truncated, not a checkpoint, unsafe to load or of another architecture."""


class DatasetError(FcnDeployError):
    """A VOC root, image or label is missing, unreadable or inconsistent."""


class ImageReadError(FcnDeployError):
    """One input image cannot be decoded."""


class ExportError(FcnDeployError):
    """ONNX export or one of its graph checks failed."""


class VerificationError(FcnDeployError):
    """A backend's output differs from the reference beyond the thresholds."""

    exit_code = 1


class BackendUnavailableError(FcnDeployError):
    """An optional backend (tensorrt, onnxruntime, onnxruntime-gpu, CUDA) is not installed or usable."""


class EngineError(FcnDeployError):
    """A TensorRT engine cannot be built, is stale, or does not fit this GPU / TensorRT version."""


class StaleArtifactError(FcnDeployError):
    """An artifact (ONNX or engine) descends from a parent that has changed since (an ONNX
    exported from an older checkpoint, an engine built from an older ONNX): rebuild it. Every
    command refuses a stale artifact the same way (:func:`fcn_deploy.chain.resolve`)."""


class InputMismatchError(FcnDeployError):
    """A runner was fed a tensor of the wrong name, dtype or shape."""
