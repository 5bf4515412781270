"""The Ray Serve application of ``fcn-deploy serve``: two deployments.

* ``SegmentIngress`` (one replica, FastAPI, no CPU reserved): the HTTP API of
  :mod:`fcn_deploy.serve.api`. It refuses bad requests itself (media type, encoding, query, body
  size, pixel limit from the image header, all before any decoding and before any model replica
  is involved), calls the model through a deployment handle with the request's timeout, and
  answers every failure with a one-line JSON error (:func:`~fcn_deploy.serve.api.error_body`).
  It owns ``/metrics`` (:mod:`fcn_deploy.serve.metrics`).
* ``SegmentModel`` (``--replicas`` replicas, each with ``--replica-cpus`` / ``--replica-gpus``):
  one :class:`~fcn_deploy.serve.core.SegmentCore` each (one activated runner and Segmenter,
  warmed up in the constructor, so Serve routes nothing to a replica before it is ready). The tiles
  of all the requests a replica works on share engine batches through Ray Serve's
  ``@serve.batch`` (``max_batch_size`` = ``--batch-size``, ``batch_wait_timeout_s`` =
  ``--batch-wait``), run in one engine thread so the event loop keeps taking requests.

Overload: a model replica works on at most ``--max-ongoing`` requests; at most ``--max-queued``
more wait for one (Serve's ``max_queued_requests``); past that the handle raises Serve's
BackPressureError and the ingress answers 503 with ``Retry-After``. Faults: a model replica that
dies is replaced by Serve's controller; each request it held is retried once by the ingress (the
work is a pure function of the body), and answered 503 if the retry's replica dies too, or 504
once its timeout has passed; none waits past its timeout. A client that disconnects cancels its
request in the ingress, which cancels the model call, which cancels its tiles still waiting for
a batch (``@serve.batch`` drops cancelled ones).

Ray, Serve, FastAPI and Starlette are imported by this module only; nothing else in the package
imports it except :mod:`fcn_deploy.serve.command`, inside functions.
"""


import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from fcn_deploy.errors import (
    BadRequestError,
    PayloadTooLargeError,
    RequestError,
    RequestTimeoutError,
    ServerBusyError,
    first_line,
)
from fcn_deploy.serve import api
from fcn_deploy.serve.api import ServeSettings

INGRESS = "SegmentIngress"
MODEL = "SegmentModel"
#: Seconds between two pushes of a model replica's counts to the ingress.
REPORT_INTERVAL_S = 1.0
#: How long /readyz waits for a model replica to answer.
READY_PROBE_S = 2.0

JSON = "application/json"


def _json_error(exc: RequestError) -> Response:
    status, body, headers = api.error_of(exc)
    return Response(body, status_code=status, headers=headers, media_type=JSON)


async def _awaitable(response):
    """A coroutine awaiting a DeploymentResponse (``asyncio.wait_for`` wants one)."""
    return await response


def _short_id(replica_id: str) -> str:
    return replica_id[-8:]


# -- the model deployment -------------------------------------------------------------------------
@serve.deployment(name=MODEL, health_check_period_s=5.0, graceful_shutdown_wait_loop_s=0.5)
class SegmentModel:
    """One :class:`~fcn_deploy.serve.core.SegmentCore` per replica; its tiles batched by Serve."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        from fcn_deploy.serve.core import SegmentCore

        self.settings = ServeSettings(**settings)
        self.core = await asyncio.to_thread(SegmentCore, self.settings)  # activate + warm up
        self.engine_pool = ThreadPoolExecutor(1, "fcn-serve-engine")
        self.run_tiles.set_max_batch_size(self.core.seg.effective_batch)
        self.run_tiles.set_batch_wait_timeout_s(self.settings.batch_wait_s)
        try:
            self.replica = _short_id(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # outside Serve (never in practice)
            self.replica = f"pid{os.getpid()}"
        self.ingress = serve.get_deployment_handle(INGRESS, app_name=self.settings.app_name)
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def run_tiles(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.engine_pool, self.core.run_batch, items)

    async def segment(self, data: bytes, output: str) -> dict[str, Any]:
        """The answer to one segment request, or its error (never raised: returned as a dict)."""
        try:
            reply = await self.core.segment(data, output, self.run_tiles)
        except RequestError as exc:
            status, body, headers = api.error_of(exc)
            return {"status": status, "body": body, "headers": headers, "media_type": JSON}
        headers = {
            "X-Tiles": str(reply.tiles),
            "X-Image-Size": f"{reply.width}x{reply.height}",
            "X-Replica": self.replica,
            "Server-Timing": api.server_timing(reply.stages),
        }
        return {"status": 200, "body": reply.body, "headers": headers, "media_type": reply.media_type,
                "tiles": reply.tiles}

    async def info(self) -> dict[str, Any]:
        return {**self.core.info(), "replica": self.replica}

    async def ping(self) -> bool:
        return self.core.seg.runner.is_active

    def check_health(self) -> None:
        """Serve's health check: a replica whose runner is no longer active is replaced."""
        if not self.core.seg.runner.is_active:
            raise RuntimeError("the runner is not active")

    async def _report_loop(self) -> None:
        while True:
            try:
                await self.ingress.report.remote(self.replica, self.core.stats.snapshot())
            except asyncio.CancelledError:
                raise
            except Exception:  # the ingress restarting or gone: the next push tries again
                pass
            await asyncio.sleep(REPORT_INTERVAL_S)

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.close()


# -- the ingress --------------------------------------------------------------------------------------
http = FastAPI(title="fcn-deploy serve", version=api.API_VERSION, openapi_url=None, docs_url=None, redoc_url=None)


@http.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {404: f"no route {request.url.path[:100]!r}; the API: POST {api.SEGMENT_ROUTE}, GET {api.MODEL_ROUTE}, "
                    "/healthz, /readyz, /metrics",
               405: f"{request.method} is not allowed on {request.url.path[:100]}"}.get(exc.status_code, str(exc.detail))
    headers = dict(exc.headers or {})
    return Response(api.error_body(exc.status_code, code, message), status_code=exc.status_code, headers=headers,
                    media_type=JSON)


@http.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return _json_error(BadRequestError(f"invalid request: {first_line(exc)}"))


@http.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> Response:
    return Response(api.error_body(500, "internal_error", f"internal error: {type(exc).__name__}: {first_line(exc)}"),
                    status_code=500, media_type=JSON)


@serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0})
@serve.ingress(http)
class SegmentIngress:
    """The HTTP API; one replica (it holds the metrics registry)."""

    def __init__(self, model, settings: dict[str, Any]) -> None:
        from fcn_deploy.images import set_max_pixels
        from fcn_deploy.serve.metrics import ServeMetrics

        self.model = model
        self.settings = ServeSettings(**settings)
        set_max_pixels(self.settings.max_pixels)
        self.metrics = ServeMetrics()
        self.draining = False
        self.in_flight = 0
        self._info: dict[str, Any] | None = None

    # -- handle methods (the driver and the model replicas call these) ---------------------------
    async def report(self, replica: str, snapshot: dict[str, Any]) -> None:
        self.metrics.replica_report(replica, snapshot)

    async def drain(self) -> int:
        """Stop taking segment requests (503 from now on); returns those still in flight."""
        self.draining = True
        self.metrics.ready.set(0)
        return self.in_flight

    async def requests_in_flight(self) -> int:
        return self.in_flight

    # -- routes -----------------------------------------------------------------------------------------
    @http.post(api.SEGMENT_ROUTE)
    async def segment(self, request: Request) -> Response:
        start = time.perf_counter()
        output = api.DEFAULT_OUTPUT
        status = 500
        self.in_flight += 1
        self.metrics.queue_depth.inc()
        try:
            response = await self._segment(request, start)
            status = response.status_code
            return response
        except RequestError as exc:
            status = exc.status
            return _json_error(exc)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's "client closed request"); nothing is sent
            raise
        except Exception as exc:
            return Response(api.error_body(500, "internal_error", f"internal error: {type(exc).__name__}: "
                                           f"{first_line(exc)}"), status_code=500, media_type=JSON)
        finally:
            self.in_flight -= 1
            self.metrics.queue_depth.dec()
            try:
                output = api.parse_query(request.query_params.multi_items())
            except RequestError:
                output = "invalid"
            self.metrics.requests.labels(str(status), output).inc()
            self.metrics.latency.labels(output).observe(time.perf_counter() - start)

    async def _segment(self, request: Request, start: float) -> Response:
        settings = self.settings
        if self.draining:
            raise ServerBusyError("the server is shutting down", headers={"Retry-After": str(settings.retry_after_s)})
        output = api.parse_query(request.query_params.multi_items())
        headers = request.headers
        api.check_headers(headers.get("content-type"), headers.get("content-encoding"), headers.get("content-length"),
                          settings.max_body_bytes)
        deadline = start + settings.timeout_s
        data = await self._read_body(request, deadline)
        probe = await asyncio.get_running_loop().run_in_executor(None, api.probe_image, data, settings.max_pixels)
        if output == "logits":
            info = await self._model_info(deadline)
            api.check_logits(int(info["num_classes"]), probe.width, probe.height, settings.max_logits_bytes)
        answer = await self._call_model(data, output, deadline)
        if answer["status"] == 200:
            self.metrics.image_tiles.observe(answer["tiles"])
        return Response(answer["body"], status_code=answer["status"], headers=answer["headers"],
                        media_type=answer["media_type"])

    async def _read_body(self, request: Request, deadline: float) -> bytes:
        limit = self.settings.max_body_bytes

        async def read() -> bytes:
            chunks, total = [], 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLargeError(api.too_large_body(None, limit))
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), max(0.0, deadline - time.perf_counter()))
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"the request body did not arrive within {self.settings.timeout_s:g} s "
                                      "(--timeout)") from None

    async def _model_info(self, deadline: float | None = None) -> dict[str, Any]:
        if self._info is None:
            timeout = READY_PROBE_S if deadline is None else max(0.0, deadline - time.perf_counter())
            self._info = await self._await(self.model.info.remote(), timeout)
        return self._info

    async def _await(self, response, timeout: float):
        """``await response`` within ``timeout`` seconds: 504 past it (the model call cancelled),
        503 + Retry-After when the queue is full or no replica can take it."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        retry = {"Retry-After": str(self.settings.retry_after_s)}
        try:
            return await asyncio.wait_for(_awaitable(response), timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestTimeoutError(f"no answer within {self.settings.timeout_s:g} s (--timeout)") from None
        except asyncio.CancelledError:
            response.cancel()
            raise
        except BackPressureError:
            raise ServerBusyError(f"the queue is full ({self.settings.max_queued} requests waiting, --max-queued); "
                                  "retry later", headers=retry) from None
        except DeploymentUnavailableError:
            raise ServerBusyError("no model replica is available; retry later", headers=retry) from None

    async def _call_model(self, data: bytes, output: str, deadline: float) -> dict[str, Any]:
        """The model's answer; a request whose replica died is retried once (503 if that dies too)."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        for attempt in (1, 2):
            try:
                return await self._await(self.model.segment.remote(data, output), max(0.0, deadline - time.perf_counter()))
            except (RayActorError, ActorUnavailableError):
                if attempt == 2:
                    raise ServerBusyError("the model replica died while working on this request, twice; retry later",
                                          headers={"Retry-After": str(self.settings.retry_after_s)}) from None
                self.metrics.retries.inc()
        raise AssertionError("unreachable")  # pragma: no cover

    @http.get(api.MODEL_ROUTE)
    async def model_info(self) -> Response:
        try:
            info = await self._model_info()
        except RequestError as exc:
            return _json_error(exc)
        import json

        return Response(json.dumps(info, separators=(",", ":")) + "\n", media_type=JSON)

    @http.get("/healthz")
    async def healthz(self) -> Response:
        return Response(b'{"status":"ok"}\n', media_type=JSON)

    @http.get("/readyz")
    async def readyz(self) -> Response:
        ready, why = not self.draining, "draining: the server is shutting down"
        if ready:
            try:
                ready = bool(await self._await(self.model.ping.remote(), READY_PROBE_S))
                why = "the runner is not active"
            except RequestError as exc:
                ready, why = False, f"no warmed model replica answered within {READY_PROBE_S:g} s ({exc})"
            except Exception as exc:
                ready, why = False, f"no warmed model replica answers: {first_line(exc)}"
        self.metrics.ready.set(1 if ready else 0)
        if ready:
            return Response(b'{"ready":true}\n', media_type=JSON)
        return Response(api.error_body(503, "not_ready", why), status_code=503, media_type=JSON,
                        headers={"Retry-After": str(self.settings.retry_after_s)})

    @http.get("/metrics")
    async def metrics(self) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, headers={"Content-Type": content_type})


def build_app(settings: ServeSettings):
    """The bound application: the ingress over ``settings.replicas`` model replicas."""
    config = settings.to_dict()
    model = SegmentModel.options(
        num_replicas=settings.replicas,
        max_ongoing_requests=settings.max_ongoing,
        max_queued_requests=settings.max_queued,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus},
        graceful_shutdown_timeout_s=settings.timeout_s,
    ).bind(config)
    capacity = settings.replicas * settings.max_ongoing + settings.max_queued
    ingress = SegmentIngress.options(
        num_replicas=1,
        max_ongoing_requests=capacity + 64,  # the model's capacity, plus room to refuse the rest quickly
        graceful_shutdown_timeout_s=settings.timeout_s,
    )
    return ingress.bind(model, config)
