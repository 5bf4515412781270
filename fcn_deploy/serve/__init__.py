"""``fcn-deploy serve``: the deployed model behind an HTTP endpoint on Ray Serve.

* :mod:`fcn_deploy.serve.api`: the versioned HTTP API without Ray (settings, limits, request
  checks, decoding from bytes, answers, one-line JSON errors);
* :mod:`fcn_deploy.serve.core`: one model replica's work without Ray (runner, Segmenter, the
  engine batch, one request's tiles and stitching);
* :mod:`fcn_deploy.serve.metrics`: the Prometheus metrics (``prometheus_client``);
* :mod:`fcn_deploy.serve.app`: the Ray Serve deployments (imports Ray, Serve, FastAPI);
* :mod:`fcn_deploy.serve.command`: :func:`serve`, what the click command wraps.

Importing this package imports neither Ray nor Serve (``pip install 'fcn-deploy[serve]'``).
See ``docs/serving.md``.
"""

from __future__ import annotations

from fcn_deploy.serve.api import ServeSettings


def serve(settings: ServeSettings, **kwargs) -> None:
    """Serve until SIGTERM / Ctrl-C (:func:`fcn_deploy.serve.command.serve`)."""
    from fcn_deploy.serve.command import serve as run

    run(settings, **kwargs)


__all__ = ["ServeSettings", "serve"]
