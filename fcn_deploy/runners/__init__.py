"""Runners: one interface (activate / infer / deactivate, usable with ``with``) per backend.

Backend modules import their heavy dependencies (torch, onnxruntime, tensorrt, pycuda) only when
a runner is created or activated, so ``import fcn_deploy.runners`` needs none of them.
"""

from fcn_deploy.runners.base import Runner, TensorSpec

__all__ = ["Runner", "TensorSpec"]
