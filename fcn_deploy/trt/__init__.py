"""TensorRT engines (TensorRT 10/11 or TensorRT-RTX): build, describe, select and run.

Modules, each importable without TensorRT, CUDA or a GPU (TensorRT is imported by the function
that needs it):

- :mod:`fcn_deploy.trt.flavour`: which TensorRT Python package (``tensorrt``, ``tensorrt_rtx``)
  and what differs between them; the collecting logger; :func:`~fcn_deploy.trt.flavour.gc_paused`.
- :mod:`fcn_deploy.trt.sidecar`: the engine's JSON sidecar (read, check, naming), this machine's
  facts, :func:`~fcn_deploy.trt.sidecar.engine_mismatch` and
  :func:`~fcn_deploy.trt.sidecar.find_engine` (which engine fits this machine and the ONNX).
- :mod:`fcn_deploy.trt.build`: :func:`~fcn_deploy.trt.build.build_engine` from an fcn-deploy ONNX.
- :mod:`fcn_deploy.trt.runtime`: :class:`~fcn_deploy.trt.runtime.TensorRTRunner`, which runs an
  engine on torch CUDA buffers and a torch stream.

The design (artifact chain, runner contract, precision policy) is in ``docs/architecture.md``.
"""
