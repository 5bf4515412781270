"""Ray plumbing shared by ``infer --ray``, ``evaluate --ray`` (and ``serve --ray``): joining or
starting a cluster, a pool of stateful actors mapping a Ray Data dataset of rows, streaming the
rows back, and turning Ray's errors into our one-line ones. Each command owns its worker:
:mod:`fcn_deploy.infer.ray` (``infer``), :mod:`fcn_deploy.evaluate` (``evaluate``).

The driver sends **paths, not pixels**: a dataset of rows (e.g. input path, output stem) is mapped
by a pool of actors (``map_batches(Worker, compute=ActorPoolStrategy(size=N), num_gpus=F)``), each
holding ONE activated runner built from the artifact the driver resolved (and checked for
staleness), read by every worker from the same path: artifacts and photos must be on a
filesystem every node sees under identical paths.

Faults: a per-item error (a corrupt file) is a returned row, never an exception, so it is not
retried. A worker process that dies (killed, out of memory) is restarted by Ray (``max_restarts``)
and the batch it held is run again (``max_task_retries``); only the retried batch's rows reach the
driver.

Ray is an optional extra (``pip install 'fcn-deploy[ray]'``), imported only by ``--ray``.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from fcn_deploy.errors import FcnDeployError, UsageError, first_line

#: What to install for ``--ray``.
RAY_EXTRA = "pip install 'fcn-deploy[ray]'"
#: Restarts of a dead worker and retries of the batch it held (Ray's actor fault tolerance).
MAX_RESTARTS = 3
#: Images per batch sent to a worker (a killed worker redoes at most this many).
IMAGES_PER_BATCH = 4


def import_ray():
    """The ``ray`` module (with Ray Data), or a one-line :class:`UsageError` naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(f"--ray needs Ray Data, which is not installed: {RAY_EXTRA}") from None
    return ray


def check_address(address: str | None) -> str | None:
    """``--ray [ADDRESS]`` as given (``""``: no address) -> None, ``local``, ``auto`` or an address
    with a port; anything else (e.g. a photo folder after a bare ``--ray``) is a one-line error."""
    if not address:
        return None
    if address in ("local", "auto") or "://" in address or address.rpartition(":")[2].isdigit():
        return address
    raise UsageError(f"--ray {address}: not a Ray address (local, auto, host:port or ray://host:port); "
                     f"put a bare --ray after the paths, or write --ray=ADDRESS")


def connect(address: str | None = None, *, num_cpus: int | None = None) -> tuple[Any, float, bool]:
    """Join or start the Ray cluster; returns (ray, start-up seconds, whether we started it).

    ``address``: None (``RAY_ADDRESS`` if set, else a running local cluster, else a new one),
    ``local`` (always a new local cluster), ``auto`` or ``ray://host:port`` (an existing one).
    ``num_cpus`` only applies to a new local cluster. Already connected: nothing happens.
    """
    import logging

    ray = import_ray()
    address = check_address(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows its own bar over the rows
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return ray, 0.0, False
    start = time.perf_counter()
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": False}
    if address in (None, "local") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise FcnDeployError(f"--ray {address or ''}: cannot join the Ray cluster: {first_line(exc)}") from None
    return ray, time.perf_counter() - start, True


def ray_failure(exc: BaseException) -> FcnDeployError:
    """Our own error inside a Ray error chain (a runner failure in a worker), else one line."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FcnDeployError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return FcnDeployError(f"the Ray run failed: {first_line(exc)}")


def gpus_per_worker(backend: str, device: str, gpus: float | None) -> float:
    """``--ray-gpus-per-worker``: given, else 1 when ``device`` resolves to CUDA here, else 0."""
    if gpus is not None:
        if gpus < 0:
            raise UsageError(f"--ray-gpus-per-worker must be >= 0, not {gpus}")
        return gpus
    if device.startswith("cuda"):
        return 1.0
    from fcn_deploy.runners.device import resolve_device

    return 1.0 if resolve_device(backend, device, echo=None).startswith("cuda") else 0.0


def resolve_artifact(backend: str, model, precision: str | None, export_dir: str | os.PathLike = "export",
                      engines_dir: str | os.PathLike = "engines") -> tuple[str, str | None]:
    """(absolute artifact path, precision) as the chain resolves them; stale: refused here."""
    from fcn_deploy.chain import resolve
    from fcn_deploy.runners.registry import get_backend

    spec = get_backend(backend)
    resolved = resolve(backend, model, export_dir=export_dir, engines_dir=engines_dir, precision=precision)
    path = resolved.require_fresh()
    return str(Path(path).resolve()), resolved.precision if spec.artifact == "checkpoint" else precision


def map_workers(ray, rows: list[dict[str, Any]], worker: type, config: dict[str, Any], *, workers: int,
                 cpus: float, gpus: float, images_per_batch: int):
    """The dataset of ``rows`` mapped by a pool of ``workers`` actors of ``worker`` (its CONFIG set).

    The config travels inside the class, not as constructor arguments in the object store, so a
    restarted actor never needs an object that may be gone. Dead actors are restarted and their
    batch retried up to :data:`MAX_RESTARTS` times (passed as Ray remote args, which Ray 2.60
    deprecates in favour of its own default: unlimited).
    """
    import warnings

    cls = type(f"{worker.__name__}Configured", (worker,), {"CONFIG": config})  # pickled by value
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // images_per_batch)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(cls, batch_size=images_per_batch, batch_format="numpy",
                              compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus,
                              max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)


def check_resources(ray, workers: int, cpus: float, gpus: float) -> None:
    """A pool the cluster can never hold is a one-line error, not a run that waits forever."""
    total = ray.cluster_resources()
    for name, need, option in (("CPU", cpus, "--ray-cpus-per-worker"), ("GPU", gpus, "--ray-gpus-per-worker")):
        have = float(total.get(name, 0.0))
        if need > have:
            raise UsageError(f"{option} {need:g}: the Ray cluster has {have:g} {name}s in all"
                             + (" (pass --ray-gpus-per-worker 0 or --device cpu for a CPU run)" if name == "GPU" else ""))
    if workers * gpus > float(total.get("GPU", 0.0)) or workers * cpus > float(total.get("CPU", 0.0)):
        import warnings

        warnings.warn(f"--ray-workers {workers}: the cluster holds fewer at once; the rest wait", stacklevel=3)


def stream_rows(ds) -> Iterator[dict[str, Any]]:
    """The rows of ``ds`` as they are produced; a failure of the run (not of the caller's loop
    body) becomes our one-line error (:func:`ray_failure`)."""
    rows = iter(ds.iter_rows())
    try:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except FcnDeployError:
                raise
            except Exception as exc:
                raise ray_failure(exc) from None
            yield row
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # the driver stops (an error, Ctrl-C): the execution and its actors stop too


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
