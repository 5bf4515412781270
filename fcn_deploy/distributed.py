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

Joining: before ``ray.init`` the address is probed (:func:`probe_cluster`): one gRPC call to the
cluster's GCS (``ray://``: to its Ray Client server) with a deadline of :data:`CONNECT_TIMEOUT_S`.
Nothing listening, a port that closes the connection, a service that is not Ray, a host that does
not resolve: each is a one-line error within seconds, where ``ray.init`` alone retries for about
ten minutes. A stale record of a local cluster (``--ray`` with no address, the cluster killed)
starts a new local cluster instead.

Ray is an optional extra (``pip install 'fcn-deploy[ray]'``), imported only by ``--ray``.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Iterator

from fcn_deploy.errors import ClusterError, FcnDeployError, UsageError, first_line

#: What to install for ``--ray``.
RAY_EXTRA = "pip install 'fcn-deploy[ray]'"
#: Restarts of a dead worker and retries of the batch it held (Ray's actor fault tolerance).
MAX_RESTARTS = 3
#: Images per batch sent to a worker (a killed worker redoes at most this many).
IMAGES_PER_BATCH = 4
#: Seconds an address has to answer the probe of :func:`probe_cluster`.
CONNECT_TIMEOUT_S = 10.0
#: ``RAY_gcs_server_port_wait_time_s`` while joining a probed cluster (unless set): Ray's own
#: connection attempts (about 30 s each), should the cluster vanish between probe and join.
JOIN_ATTEMPTS = 2


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


def probe_cluster(address: str, timeout: float = CONNECT_TIMEOUT_S, label: str | None = None) -> None:
    """Raise a one-line :class:`~fcn_deploy.errors.ClusterError` unless a Ray cluster answers
    at ``address`` (``host:port`` of its GCS, or ``ray://host:port`` of its Ray Client server)
    within ``timeout`` seconds: one gRPC call (GCS ``GetClusterId``, Ray Client ``ClusterInfo``
    PING) through grpcio and Ray's own generated stubs; a refusal for want of credentials counts
    as an answer (it is Ray). ``label`` names the address in the message (default: itself)."""
    client = address.startswith("ray://")
    target = address[len("ray://"):] if client else address
    label = label or f"--ray {address}"
    what = "Ray Client server" if client else "Ray cluster (GCS)"
    try:
        import grpc
    except ImportError:  # Ray without its client extra: only whether something listens there
        _probe_tcp(target, timeout, label)
        return
    channel = grpc.insecure_channel(target)
    try:
        if client:
            from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
                ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=timeout)
        else:
            from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return  # a Ray cluster that wants a token: ray.init says the rest
        details = exc.details() if hasattr(exc, "details") else str(exc)
        details = first_line(ValueError(str(details).replace("failed to connect to all addresses; last error: ", "")), 160)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            reason = f"no answer within {timeout:g} s"
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            reason = f"the service there is not a {what}"
        elif code == grpc.StatusCode.UNAVAILABLE:
            reason = f"nothing there answers as a {what} ({details})"
        else:
            reason = f"{code.name if code else 'error'}: {details}"
        raise ClusterError(f"{label}: cannot join the Ray cluster at {target}: {reason}") from None
    finally:
        channel.close()


def _probe_tcp(target: str, timeout: float, label: str) -> None:
    """The probe without grpcio: a TCP connection to ``host:port`` within ``timeout`` seconds."""
    import socket

    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else \
            f"nothing listens there ({getattr(exc, 'strerror', None) or exc})"
        raise ClusterError(f"{label}: cannot join the Ray cluster at {target}: {reason}") from None


def _bootstrap(ray, address: str | None) -> tuple[str | None, str | None]:
    """(the address ``ray.init`` would join, where it came from) for ``address`` None or
    ``auto`` (``RAY_ADDRESS``, or the record of the latest local cluster); (None, None) when a
    new local cluster is to start."""
    try:
        from ray._private import services
    except ImportError:  # pragma: no cover - Ray moved it: join without the probe
        return None, None
    env = os.environ.get("RAY_ADDRESS") or None
    try:
        found = services.canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise ClusterError(f"--ray {address or ''}: cannot join a Ray cluster: {first_line(exc)}") from None
    if found is None:
        return None, None
    return found, ("RAY_ADDRESS" if env else "the record of the latest local cluster")


def connect(address: str | None = None, *, num_cpus: int | None = None) -> tuple[Any, float, bool]:
    """Join or start the Ray cluster; returns (ray, start-up seconds, whether we started it).

    ``address``: None (``RAY_ADDRESS`` if set, else a running local cluster, else a new one),
    ``local`` (always a new local cluster), ``auto``, ``host:port`` or ``ray://host:port`` (an
    existing one). An address to join is probed first (:func:`probe_cluster`): one line within
    :data:`CONNECT_TIMEOUT_S` seconds when nothing Ray answers there; with no address, a dead
    local cluster's record starts a new one. ``num_cpus`` only applies to a new local cluster.
    Already connected: nothing happens.
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
    join = address
    if address is None or address == "auto":
        join, source = _bootstrap(ray, address)
        if join is not None:
            try:
                probe_cluster(join, label=f"--ray {address or ''}".rstrip() + f" ({source})")
            except FcnDeployError:
                if address is not None or os.environ.get("RAY_ADDRESS"):
                    raise
                address = "local"  # a local cluster's record outlived it: start a new one
    elif address != "local":
        probe_cluster(address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": False}
    if address in (None, "local") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    joining = address not in (None, "local") or (address is None and join is not None)
    previous = os.environ.get("RAY_gcs_server_port_wait_time_s")
    if joining and previous is None:
        os.environ["RAY_gcs_server_port_wait_time_s"] = str(JOIN_ATTEMPTS)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ClusterError(f"--ray {address or ''}: cannot join the Ray cluster: {first_line(exc)}") from None
    finally:
        if joining and previous is None:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)
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
    return ClusterError(f"the Ray run failed: {first_line(exc)}")


def gpus_per_worker(backend: str, device: str, gpus: float | None) -> float:
    """``--ray-gpus-per-worker``: given, else 1 when ``device`` resolves to CUDA here, else 0."""
    if gpus is not None:
        if gpus < 0:
            raise UsageError(f"--ray-gpus-per-worker must be >= 0, not {gpus}")
        return gpus
    from fcn_deploy.runners.device import gpu_runtime, is_cuda, resolve_device

    if gpu_runtime(backend) == "trt":  # TensorRT runs on a GPU only (the workers' GPU, not the driver's)
        return 1.0
    return 1.0 if is_cuda(resolve_device(backend, device, echo=None)) else 0.0


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
