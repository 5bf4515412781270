"""Typed errors. Every expected failure raises a subclass of :class:`FcnDeployError`;
the CLI prints ``error: <message>`` on one line and exits with :attr:`exit_code`."""

from __future__ import annotations


import errno as _errno


def first_line(exc: BaseException, limit: int = 300) -> str:
    """First non-empty line of ``exc``'s message, or its type name: what a one-line error may
    quote of a third-party exception. A line longer than ``limit`` characters is cut at the last
    word boundary before it and ends with an ellipsis (never mid-word)."""
    lines = str(exc).strip().splitlines()
    return shorten(lines[0], limit) if lines else type(exc).__name__


def shorten(text: str, limit: int = 300) -> str:
    """``text`` if it has at most ``limit`` characters, else its longest prefix ending at a word
    boundary (a whole word, no cut word) followed by ``...``, at most ``limit`` characters."""
    if len(text) <= limit:
        return text
    head = text[: max(limit - 3, 1) + 1]  # one character more, to see whether a word ends there
    cut = head.rfind(" ")
    head = head[:cut] if cut > 0 else head[: max(limit - 3, 1)]
    return head.rstrip(" ,;:") + "..."


class FcnDeployError(Exception):
    """Root of every error this package raises on purpose (bad input, missing artifact, ...)."""

    exit_code = 2


class UsageError(FcnDeployError):
    """An option or argument has a value that cannot work (e.g. a height not divisible by 32)."""


class ArtifactExistsError(FcnDeployError):
    """An output exists already and ``--force`` was not given."""


class ArtifactNotFoundError(FcnDeployError):
    """A model, ONNX or engine file the command needs is absent."""


class ArtifactReadError(FcnDeployError):
    """An artifact exists but cannot be read as what it claims to be (a corrupt or foreign ONNX,
    engine or checkpoint): unlike a stale one, rebuilding its parent does not help."""


class CheckpointError(ArtifactReadError):
    """A checkpoint is truncated, not a checkpoint, unsafe to load or of another architecture."""


class DatasetError(FcnDeployError):
    """A VOC root, image or label is missing, unreadable or inconsistent."""


class ImageReadError(FcnDeployError):
    """One input image cannot be decoded."""


class ImageTooLargeError(ImageReadError):
    """An input image has more pixels than the enforced limit (``--max-pixels``)."""


#: errno values that mean the disk (or the user's quota) is full: nothing more can be written.
DISK_FULL_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT})


class OutputWriteError(FcnDeployError):
    """Writing an output file failed (disk full, file-size limit, I/O error, read-only disk);
    :attr:`errno` keeps the OS error number, :attr:`disk_full` says whether nothing more fits."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @property
    def disk_full(self) -> bool:
        return self.errno in DISK_FULL_ERRNOS


class DiskFullError(OutputWriteError):
    """The output disk is full: a run stops at the first such error rather than trying every
    remaining image."""


class ExportError(FcnDeployError):
    """ONNX export or one of its graph checks failed."""


class ArtifactMetadataError(ArtifactReadError):
    """An artifact's fcn-deploy metadata has a key of the wrong kind (e.g. ``std`` with a zero,
    ``mean`` not three numbers): the message names the file and the key."""


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


class RunnerStateError(FcnDeployError):
    """A runner was used out of order: activated twice, or run before :meth:`activate`."""


class ClusterError(FcnDeployError):
    """The Ray cluster cannot be joined, or a run on it failed (not one image: the run)."""


class RequestError(FcnDeployError):
    """A request to ``fcn-deploy serve`` that the server refuses (:mod:`fcn_deploy.serve`):
    :attr:`status` is its HTTP status, :attr:`code` a short machine-readable name, and the
    message one line naming the problem; :attr:`headers` go on the response (``Retry-After``)."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = dict(headers or {})


class BadRequestError(RequestError):
    """400: not an image, a corrupt one, or an unknown query parameter."""

    status, code = 400, "bad_request"


class PayloadTooLargeError(RequestError):
    """413: a body, an image (pixels, from its header) or an output past the server's limits."""

    status, code = 413, "payload_too_large"


class UnsupportedMediaTypeError(RequestError):
    """415: a Content-Type or Content-Encoding the server does not take."""

    status, code = 415, "unsupported_media_type"


class ServerBusyError(RequestError):
    """503: the queue is full, no replica is ready, or the server is shutting down."""

    status, code = 503, "unavailable"


class RequestTimeoutError(RequestError):
    """504: the request did not finish within the server's timeout."""

    status, code = 504, "timeout"
