"""ONNX export: :mod:`~fcn_deploy.export.torch_export` (PyTorch -> ONNX, ``fcn-deploy export``),
:mod:`~fcn_deploy.export.graph` (graph checks), :mod:`~fcn_deploy.export.fp16` (FP16 conversion),
:mod:`~fcn_deploy.export.verify` (verification with the parity metrics and thresholds).

Re-exported here: the functions the README's API section shows.
"""

from fcn_deploy.export.fp16 import convert_fp16
from fcn_deploy.export.torch_export import export_artifacts, export_onnx

__all__ = ["convert_fp16", "export_artifacts", "export_onnx"]
