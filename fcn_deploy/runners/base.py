"""The runner interface every backend implements (modelled on Polygraphy's BaseRunner).

A runner is built from an artifact path and does nothing heavy until :meth:`Runner.activate`.
Use it as::

    with OnnxRuntimeRunner("export/fcn.onnx") as runner:
        logits = runner.infer(tiles)                 # (N, 21, H, W) float32 or float16
        labels = runner.infer(tiles, output="labels")  # (N, H, W) uint8

``tiles`` is float32 NCHW (N, 3, H, W), already ImageNet-normalised, with (H, W) the runner's
tile size (320x480 by default). The base class checks dtype and shape of what it is fed and
says "received X, expected Y"; subclasses implement ``_activate``, ``_infer`` and
``_deactivate``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fcn_deploy.errors import FcnDeployError, InputMismatchError

Output = Literal["logits", "labels"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (``-1`` for a dynamic dimension) and numpy dtype name of one IO tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        dims = ",".join("N" if d < 0 else str(d) for d in self.shape)
        return f"{self.name} {self.dtype} ({dims})"


class Runner:
    """Base class of every backend runner.

    Subclasses set :attr:`name`, fill :attr:`input_spec` / :attr:`meta` (at the latest in
    ``_activate``) and implement ``_activate``, ``_infer`` and ``_deactivate``.
    """

    #: Short backend name used on the command line and in reports ("torch", "ort", "trt").
    name: str = "base"

    def __init__(self) -> None:
        self.is_active = False
        #: Spec of the image input; batch dimension -1 when dynamic.
        self.input_spec: TensorSpec | None = None
        #: Largest batch this runner accepts (``None``: unbounded).
        self.max_batch: int | None = None
        #: Artifact metadata: classes, colormap, mean, std, tile_hw, precision, ...
        self.meta: dict[str, Any] = {}
        #: Seconds the last :meth:`infer` call spent in the backend (inputs checked, outputs on host).
        self.last_inference_time: float = 0.0
        #: Sum of backend seconds over all :meth:`infer` calls since activation.
        self.total_inference_time: float = 0.0

    # -- lifecycle -----------------------------------------------------------------------
    def activate(self) -> "Runner":
        if self.is_active:
            raise FcnDeployError(f"{self.name} runner is already active")
        self._activate()
        self.is_active = True
        self.total_inference_time = 0.0
        return self

    def deactivate(self) -> None:
        if self.is_active:
            try:
                self._deactivate()
            finally:
                self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- inference -----------------------------------------------------------------------
    @property
    def tile_hw(self) -> tuple[int, int]:
        """(height, width) of the tiles this runner takes."""
        if self.input_spec is None:
            raise FcnDeployError(f"{self.name} runner: input spec unknown before activate()")
        return int(self.input_spec.shape[2]), int(self.input_spec.shape[3])

    def check_input(self, tiles: Any) -> np.ndarray:
        """Validate ``tiles`` against :attr:`input_spec`; return it as a C-contiguous array."""
        spec = self.input_spec
        if spec is None:
            raise FcnDeployError(f"{self.name} runner must be activated before infer()")
        if not isinstance(tiles, np.ndarray):
            raise InputMismatchError(
                f"{self.name}: received {type(tiles).__name__}, expected numpy.ndarray {spec.describe()}"
            )
        received = f"{tiles.dtype} {tuple(tiles.shape)}"
        if tiles.dtype != np.dtype(spec.dtype):
            raise InputMismatchError(f"{self.name}: received {received}, expected {spec.describe()}")
        # the batch dimension is checked below: a fixed batch takes smaller batches (padded)
        if tiles.ndim != len(spec.shape) or any(
            e >= 0 and e != r for e, r in zip(spec.shape[1:], tiles.shape[1:])
        ):
            raise InputMismatchError(f"{self.name}: received {received}, expected {spec.describe()}")
        if tiles.shape[0] < 1:
            raise InputMismatchError(f"{self.name}: received an empty batch {received}")
        limits = [b for b in (self.max_batch, spec.shape[0]) if b is not None and b > 0]
        if limits and tiles.shape[0] > min(limits):
            raise InputMismatchError(
                f"{self.name}: received {received}, at most {min(limits)} tiles per batch allowed"
            )
        return np.ascontiguousarray(tiles)

    def infer(self, tiles: np.ndarray, output: Output = "logits") -> np.ndarray:
        """Run one batch.

        Args:
            tiles: float32 (N, 3, H, W), ImageNet-normalised; for a model with a fixed batch B,
                any N <= B (padded with zero tiles whose outputs are dropped).
            output: ``"logits"`` for (N, C, H, W) float32/float16 logits, ``"labels"`` for
                (N, H, W) uint8 class indices (argmax computed where it is cheapest).
        """
        if output not in ("logits", "labels"):
            raise FcnDeployError(f"output must be 'logits' or 'labels', not {output!r}")
        tiles = self.check_input(tiles)
        n, fixed = tiles.shape[0], self.input_spec.shape[0]
        if 0 < n < fixed:  # a fixed-batch model: pad with zero tiles, drop their outputs
            tiles = np.concatenate([tiles, np.zeros((fixed - n, *tiles.shape[1:]), tiles.dtype)])
        start = time.perf_counter()
        result = self._infer(tiles, output)[:n]
        self.last_inference_time = time.perf_counter() - start
        self.total_inference_time += self.last_inference_time
        return result

    # -- to implement --------------------------------------------------------------------
    def _activate(self) -> None:
        raise NotImplementedError

    def _infer(self, tiles: np.ndarray, output: Output) -> np.ndarray:
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError


def argmax_labels(logits: np.ndarray) -> np.ndarray:
    """(N, C, H, W) logits -> (N, H, W) uint8 class indices (first maximum wins, NaN -> 255),
    with :func:`fcn_deploy.tiling.argmax_classes` (several times faster than ``np.argmax``)."""
    from fcn_deploy.tiling import argmax_classes

    if len(logits) == 0:
        return np.zeros((0, *logits.shape[2:]), np.uint8)
    return np.stack([argmax_classes(x) for x in logits])
