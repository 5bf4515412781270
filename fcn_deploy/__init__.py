"""fcn-deploy: train, export, compile, run and verify the d2l fully convolutional network."""

__version__ = "0.1.0"

from fcn_deploy.errors import FcnDeployError  # noqa: E402

__all__ = ["FcnDeployError", "__version__"]
