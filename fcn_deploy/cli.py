"""The ``fcn-deploy`` command line: a click group; each command is a thin wrapper over one
library function. Errors of type :class:`~fcn_deploy.errors.FcnDeployError` become one line
``error: ...`` on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import sys

import click

from fcn_deploy import __version__
from fcn_deploy.errors import FcnDeployError


class _Group(click.Group):
    """Click group that turns our typed errors into clean one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FcnDeployError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fcn-deploy")
def cli() -> None:
    """Train, export, compile, run and verify the d2l FCN segmentation network.

    \b
    fcn-deploy synth-voc data/          write a small synthetic VOC-format dataset
    fcn-deploy train --voc-root data/VOCdevkit/VOC2012 -o model.pt
    fcn-deploy export model.pt          -> export/fcn.onnx (+ fcn.json)
    fcn-deploy build-engine --fp16      -> engines/*.engine (+ .json)
    fcn-deploy infer photos/ -o out/    tiled inference of any image size
    fcn-deploy check                    parity of every backend against PyTorch
    """


# --- data and training (fcn_deploy.voc, fcn_deploy.train) -------------------------------
# [cli:train]

# --- export (fcn_deploy.export) -----------------------------------------------------------
# [cli:export]

# --- TensorRT engines (fcn_deploy.engine) -------------------------------------------------
# [cli:engine]

# --- inference (fcn_deploy.infer) ---------------------------------------------------------
# [cli:infer]

# --- parity, evaluation, benchmarks (fcn_deploy.parity, fcn_deploy.evaluate, fcn_deploy.bench)
# [cli:check]

# --- demo (fcn_deploy.demo) -----------------------------------------------------------------
# [cli:demo]


def main() -> None:
    cli(prog_name="fcn-deploy")


if __name__ == "__main__":
    main()
