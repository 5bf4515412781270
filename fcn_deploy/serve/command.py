"""``fcn-deploy serve``: :func:`serve` checks everything it can before Ray starts (options, the
backend's packages, the artifact from the chain and its freshness, the port), joins or starts
the Ray cluster, runs the application of :mod:`fcn_deploy.serve.app` on Ray Serve, waits until
its model replicas are warmed, then serves until SIGTERM or Ctrl-C.

Shutdown drains: the ingress stops taking segment requests (503 + Retry-After, ``/readyz`` 503),
the requests in flight finish (at most ``--timeout`` seconds), then the application is deleted
and, when this command started the cluster, the cluster is stopped; the CLI then exits with
``infer``'s codes (143 for SIGTERM, 130 for Ctrl-C).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from fcn_deploy.errors import ArtifactNotFoundError, BackendUnavailableError, FcnDeployError, UsageError, first_line
from fcn_deploy.serve.api import ServeSettings

#: What to install for ``serve``.
SERVE_EXTRA = "pip install 'fcn-deploy[serve]'"
#: Seconds between two looks at the requests still in flight while draining.
DRAIN_POLL_S = 0.1


def import_serve():
    """``ray.serve`` (with FastAPI), or a one-line :class:`UsageError` naming the extra."""
    try:
        import fastapi  # noqa: F401
        import ray
        from ray import serve
    except ImportError:
        raise UsageError(f"fcn-deploy serve needs Ray Serve, which is not installed: {SERVE_EXTRA}") from None
    return ray, serve


def prepare(settings: ServeSettings, *, export_dir: str | os.PathLike = "export",
            engines_dir: str | os.PathLike = "engines", echo: Callable[[str], None] | None = None) -> ServeSettings:
    """``settings`` checked and completed before any Ray process starts: the backend installed, the
    device resolved (``auto`` -> ``cpu`` / ``cuda:N``; GPUs per replica 1 on CUDA unless given),
    the artifact resolved from the chain, present and fresh (a stale one is refused here, as by
    ``infer``), as an absolute path every replica can open."""
    from fcn_deploy.chain import resolve
    from fcn_deploy.runners.device import resolve_device
    from fcn_deploy.runners.registry import get_backend

    settings.check()
    spec = get_backend(settings.backend)
    missing = spec.available()
    if missing:
        raise BackendUnavailableError(missing)
    device = resolve_device(settings.backend, settings.device, echo=echo)
    resolved = resolve(settings.backend, settings.model, export_dir=export_dir, engines_dir=engines_dir,
                       precision=settings.precision)
    path = resolved.require_fresh()
    if not Path(path).is_file():
        raise ArtifactNotFoundError(f"{path}: no such model file")
    precision = resolved.precision if spec.artifact == "checkpoint" else settings.precision
    gpus = settings.replica_gpus
    if gpus is None:
        gpus = 1.0 if device.startswith("cuda") else 0.0
    return replace(settings, model=str(Path(path).resolve()), device=device, precision=precision,
                   replica_gpus=float(gpus))


def check_port(host: str, port: int) -> None:
    """One line when ``host:port`` cannot be bound (in use, or no such address here)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                             "pick another --port") from None


def connect(address: str | None) -> tuple[Any, bool]:
    """Start a private local Ray cluster (``address`` None) or join one as ``infer --ray`` does
    (``""``: RAY_ADDRESS, a running local cluster or a new one; ``local``, ``auto``,
    ``host:port``, ``ray://host:port``). Returns (ray, whether this process started the cluster)."""
    from fcn_deploy.distributed import check_address, probe_cluster

    ray, _ = import_serve()
    if address is None:
        target = "local"
    else:
        target = check_address(address)
    if ray.is_initialized():
        return ray, False
    if target not in (None, "local", "auto"):
        probe_cluster(target)  # one line within seconds where no Ray answers, not a hang
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    try:
        ray.init(address=target, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise FcnDeployError(f"--ray {address or ''}: cannot join the Ray cluster: {first_line(exc)}") from None
    node = getattr(getattr(ray, "_private", None) and ray._private.worker, "_global_node", None)
    started = target == "local" or bool(node is not None and node.is_head())
    return ray, started


@contextlib.contextmanager
def _keep_signal_handlers():
    """Around starting Ray (main thread only): the Ray processes started in the block ignore
    SIGINT (they share the terminal's process group, so a Ctrl-C meant for this command would
    stop the cluster before the drain), and the SIGTERM / SIGINT handlers set before the block
    are restored after it (``ray.init`` installs its own SIGTERM handler, a plain exit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the processes started here
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


_OUR_ERROR = re.compile(r"fcn_deploy\.errors\.(\w+Error): (.+)")


def _deploy_failure(exc: BaseException) -> FcnDeployError:
    """A replica constructor's failure as one line: our own error when the Ray text holds one."""
    text = str(exc)
    found = _OUR_ERROR.findall(text)
    if found:
        return FcnDeployError(f"a model replica failed to start: {found[-1][1].strip()}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(" ")]
    last = next((ln for ln in reversed(lines) if re.match(r"^\w+(\.\w+)*(Error|Exception):", ln)), None)
    return FcnDeployError(f"the Serve application failed to start: {last or first_line(exc)}")


class Server:
    """A running ``fcn-deploy serve`` (what :func:`start` returns; :func:`serve` blocks on it)."""

    def __init__(self, settings: ServeSettings, ray, serve_module, started_cluster: bool, startup_s: float) -> None:
        self.settings = settings
        self.ray, self.serve = ray, serve_module
        self.started_cluster = started_cluster
        self.startup_s = startup_s
        self.url = f"http://{settings.host}:{settings.port}"
        self._closed = False

    def ingress(self):
        from fcn_deploy.serve.app import INGRESS

        return self.serve.get_deployment_handle(INGRESS, app_name=self.settings.app_name)

    def model(self):
        from fcn_deploy.serve.app import MODEL

        return self.serve.get_deployment_handle(MODEL, app_name=self.settings.app_name)

    def drain(self, timeout_s: float | None = None) -> int:
        """Stop taking segment requests and wait for those in flight (at most ``timeout_s``, default
        the request timeout); returns how many were still in flight when the wait ended."""
        timeout_s = self.settings.timeout_s if timeout_s is None else timeout_s
        handle = self.ingress()
        try:
            left = handle.drain.remote().result(timeout_s=10)
            deadline = time.monotonic() + timeout_s
            while left and time.monotonic() < deadline:
                time.sleep(DRAIN_POLL_S)
                left = handle.requests_in_flight.remote().result(timeout_s=10)
        except Exception:  # the ingress is gone: nothing left to drain
            return 0
        return left

    def close(self) -> None:
        """Delete the application; stop the cluster if this process started it."""
        if self._closed:
            return
        self._closed = True
        if self.started_cluster:  # the whole cluster goes: Serve with it (its own shutdown only adds noise)
            self.ray.shutdown()
        else:
            self.serve.delete(self.settings.app_name)


def start(settings: ServeSettings, *, ray_address: str | None = None, export_dir: str | os.PathLike = "export",
          engines_dir: str | os.PathLike = "engines", echo: Callable[[str], None] | None = None) -> Server:
    """Check, connect, deploy; returns once every model replica is warmed and serving."""
    begin = time.perf_counter()
    settings = prepare(settings, export_dir=export_dir, engines_dir=engines_dir, echo=echo)
    import_serve()
    check_port(settings.host, settings.port)
    with _keep_signal_handlers():
        ray, started = connect(ray_address)
    _, serve = import_serve()
    try:
        _check_resources(ray, settings)
        from fcn_deploy.serve.app import build_app

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(http_options={"host": settings.host, "port": settings.port,
                                  "request_timeout_s": settings.timeout_s + 10.0},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        try:
            serve.run(build_app(settings), name=settings.app_name, route_prefix="/", blocking=False)
        except FcnDeployError:
            raise
        except Exception as exc:
            raise _deploy_failure(exc) from None
        _check_listening(settings)
    except BaseException:
        if started:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        raise
    return Server(settings, ray, serve, started, time.perf_counter() - begin)


def _check_listening(settings: ServeSettings, wait_s: float = 15.0) -> None:
    """The application answers on ``--host``/``--port`` (a joined cluster whose Serve already
    listens elsewhere keeps its own HTTP options: then say so rather than print a wrong URL)."""
    import urllib.request

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else ("::1" if settings.host == "::" else settings.host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}/healthz"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as res:
                if res.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise FcnDeployError(f"the application does not answer on {settings.host}:{settings.port}; a Ray Serve "
                                 "already running on this cluster with other HTTP options keeps them (stop it, or "
                                 "serve on its port)")
        time.sleep(0.2)


def _check_resources(ray, settings: ServeSettings) -> None:
    total = ray.cluster_resources()
    for name, need, option in (("CPU", settings.replica_cpus, "--replica-cpus"),
                               ("GPU", settings.replica_gpus, "--replica-gpus")):
        have = float(total.get(name, 0.0))
        if need > have:
            raise UsageError(f"{option} {need:g}: the Ray cluster has {have:g} {name}s in all"
                             + (" (use --device cpu for a CPU server)" if name == "GPU" else ""))


def serve(settings: ServeSettings, *, ray_address: str | None = None, echo: Callable[[str], None] = print,
          export_dir: str | os.PathLike = "export", engines_dir: str | os.PathLike = "engines") -> None:
    """Serve until interrupted: SIGTERM / Ctrl-C (KeyboardInterrupt, re-raised after the drain,
    for the CLI's exit codes) drain the requests in flight, then the server stops."""
    server = start(settings, ray_address=ray_address, echo=echo, export_dir=export_dir, engines_dir=engines_dir)
    s = server.settings
    try:
        echo(f"serving {s.backend} {Path(s.model).name} on {s.device}: {s.replicas} replica(s), batches of "
             f"{s.batch_size} tiles; ready in {server.startup_s:.1f} s")
        echo(f"POST {server.url}/v1/segment  (GET /v1/model, /healthz, /readyz, /metrics); Ctrl-C or SIGTERM stops")
        while True:
            time.sleep(1.0)
            if not server.ray.is_initialized():
                raise FcnDeployError("the Ray cluster went away; the server stopped")
    except KeyboardInterrupt:
        try:
            left = server.drain()
            echo(f"drained: {'all requests answered' if not left else f'{left} requests still in flight'}; stopping")
        finally:
            server.close()
        raise
    finally:
        server.close()
