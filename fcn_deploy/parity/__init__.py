"""Accuracy parity of every backend against the float32 PyTorch reference (``fcn-deploy check``).

Modules: :mod:`~fcn_deploy.parity.metrics` (the streamed metrics), :mod:`~fcn_deploy.parity.thresholds`
(limits per precision, ``--threshold``), :mod:`~fcn_deploy.parity.tiles` (tile sources),
:mod:`~fcn_deploy.parity.report` (the report and disagreement maps), :mod:`~fcn_deploy.parity.check`
(the command, :func:`fcn_deploy.parity.check.check`).
"""
