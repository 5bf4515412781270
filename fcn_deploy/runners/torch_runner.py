"""PyTorch runner: the float32 reference (CPU, or CUDA with TF32 off) and the CUDA FP16 path.

``TorchRunner("model.pt")`` loads the checkpoint in :meth:`activate`; tiles are float32
(N, 3, H, W) with (H, W) = ``tile_hw`` (any multiples of 32: the FCN is fully convolutional).
Results: logits (N, C, H, W) float32 (float16 when ``precision="fp16"``) or, with
``output="labels"``, (N, H, W) uint8 computed by an argmax on the device. Fed a ``torch.Tensor``
on :attr:`TorchRunner.device`, everything stays on the device (no host round trip); fed numpy,
only the labels or logits cross to the host (measured on an H200 at batch 32: float32 logits took 280 ms to reach a fresh
numpy array through pageable memory, 140 ms through the pinned buffer used here; the whole
host-to-host labels call 28 ms, of which 18 ms forward).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from fcn_deploy.errors import BackendUnavailableError, UsageError
from fcn_deploy.runners.base import Capabilities, Output, Runner, TensorSpec
from fcn_deploy.defaults import TILE_HW

PRECISIONS = ("fp32", "fp16")


def _disable_tf32(torch) -> Callable[[], None]:
    """Make CUDA float32 convolutions and matmuls full IEEE precision; return a restore function.

    TF32 alone moved 0.1% of argmax pixels on an H200 (docs/architecture.md), so the reference runs
    without it. Uses the ``fp32_precision`` API where torch has it (>= 2.9), else ``allow_tf32``.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        saved = (conv.fp32_precision, matmul.fp32_precision)
        conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"

        def restore() -> None:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:
        saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = False, False

        def restore() -> None:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved

    return restore


class TorchRunner(Runner):
    """Runs an fcn-deploy checkpoint with PyTorch.

    Args:
        checkpoint: path of a checkpoint written by ``fcn-deploy train`` (or a bare state dict).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (kept as ``cpu`` or ``cuda:N``).
        precision: ``fp32`` or ``fp16`` (CUDA only; inputs stay float32, cast on the device).
        tile_hw: (height, width) of the tiles it accepts, both multiples of 32.
        channels_last: NHWC memory format on the device (tensor-core friendly for FP16
            convolutions); default: on for fp16 (CUDA), off for fp32.
    """

    name = "torch"
    #: Tensors stay on the device (the model runs on them); inputs can be staged for bench.
    capabilities = Capabilities(device_tensors=True, staged=True)

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        tile_hw: tuple[int, int] = TILE_HW,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__(checkpoint)
        from fcn_deploy.runners.device import resolve_device

        self.device = resolve_device("torch", device)  # "auto": CUDA if torch sees a GPU
        if precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if precision == "fp16" and self.device == "cpu":
            raise UsageError("--precision fp16 needs --device cuda (the CPU reference runs in fp32)")
        th, tw = (int(v) for v in tile_hw)
        if th <= 0 or tw <= 0 or th % 32 or tw % 32:
            raise UsageError(f"tile size must be positive multiples of 32, not {th}x{tw}")
        self.precision = precision
        self.channels_last = (precision == "fp16") if channels_last is None else bool(channels_last)
        self._tile_hw = (th, tw)
        self._model: Any = None
        self._torch: Any = None
        self._restore_tf32: Callable[[], None] | None = None
        self._pinned: Any = None  # reused pinned host buffer for CUDA logits

    # -- lifecycle -----------------------------------------------------------------------
    def _activate(self) -> None:
        import torch

        from fcn_deploy.model import load_checkpoint

        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BackendUnavailableError(
                    f"--device {self.device}: this PyTorch ({torch.__version__}) sees no CUDA GPU; "
                    "install a CUDA build of torch or use --device cpu"
                )
            index = int(self.device.split(":")[1])
            if index >= torch.cuda.device_count():
                raise BackendUnavailableError(
                    f"--device {self.device}: only {torch.cuda.device_count()} CUDA device(s) visible"
                )
        model, meta = load_checkpoint(self.artifact)
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        model = model.to(device=self.device, dtype=dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.device.startswith("cuda") and self.precision == "fp32":
            self._restore_tf32 = _disable_tf32(torch)  # the fp32 reference: IEEE float32
        self._torch, self._model = torch, model
        th, tw = self._tile_hw
        self.input_spec = TensorSpec("image", (-1, 3, th, tw), "float32")
        self.meta = {
            "classes": list(meta["classes"]),
            "colormap": [list(c) for c in meta["colormap"]],
            "mean": list(meta["mean"]),
            "std": list(meta["std"]),
            "num_classes": int(meta["num_classes"]),
            "tile_hw": [th, tw],
            "precision": self.precision,
            "device": self.device,
        }

    def _deactivate(self) -> None:
        if self._restore_tf32 is not None:
            self._restore_tf32()
            self._restore_tf32 = None
        self._model = self._pinned = None
        if self._torch is not None and self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

    # -- inference -----------------------------------------------------------------------
    def _prepare(self, x):
        """float32 (N, 3, H, W) on the device -> the model's dtype and memory format."""
        if self.precision == "fp16":
            x = x.half()
        if self.channels_last:
            x = x.contiguous(memory_format=self._torch.channels_last)
        return x

    def _to_device(self, tiles: np.ndarray):
        return self._prepare(self._torch.from_numpy(tiles).to(self.device))

    def stage(self, tiles: np.ndarray):
        """Validate float32 (N, 3, H, W) ``tiles`` and copy them to the device once.

        Returns a device tensor in the runner's dtype and memory format for :meth:`run_staged`
        (benchmarks time the engine alone on device-resident inputs this way).
        """
        return self._to_device(self.check_input(tiles))

    def run_staged(self, staged) -> None:
        """One forward pass on a :meth:`stage`-d tensor; returns when the device is done."""
        with self._torch.inference_mode():
            self._model(staged)
        if self.device.startswith("cuda"):
            self._torch.cuda.synchronize(self.device)

    def _forward(self, x, output: Output):
        """Prepared input -> logits (N, C, H, W) contiguous NCHW, or labels (N, H, W) uint8;
        on the device, asynchronous on CUDA (the caller's current stream)."""
        y = self._model(x)
        if output == "labels":
            return self._torch.argmax(y, dim=1).to(self._torch.uint8)
        return y.contiguous()  # channels_last output -> NCHW

    def _infer_tensor(self, tiles, output: Output):
        # no_grad rather than inference_mode: callers may update the results in place
        with self._torch.no_grad():
            return self._forward(self._prepare(tiles), output)

    def _infer(self, tiles: np.ndarray, output: Output) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            y = self._forward(self._to_device(tiles), output)
            if self.device == "cpu" or output == "labels":
                return y.cpu().numpy()
            # Logits leave the GPU through a reused pinned buffer: on an H200 (batch 32, fp32)
            # 140 ms instead of 280 ms into fresh pageable memory. Blocking copy: the base
            # class times the whole call.
            buf = self._pinned
            if buf is None or buf.shape[0] < y.shape[0] or buf.shape[1:] != y.shape[1:] or buf.dtype != y.dtype:
                buf = self._pinned = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
            out = buf[: y.shape[0]]
            out.copy_(y)
            return out.numpy().copy()
