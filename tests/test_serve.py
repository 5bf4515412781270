"""``fcn-deploy serve`` over real HTTP: one real server per module, started as a user starts it
(``python -m fcn_deploy serve``, its own local Ray cluster and Serve app), on the session's
random-weight ONNX. Masks against ``infer``'s, hostile requests, limits, the queue-full path, a
timeout, a disconnecting client, a killed replica, a burst of bad requests, and the SIGTERM
drain with infer's exit code (the last test: it stops the server).

Needs the ``serve`` extra (CI installs it: Makefile EXTRAS). Timings are printed (the killed
replica's time to recover), never asserted.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray.serve", reason="the 'serve' extra (CI installs it)")
pytest.importorskip("fastapi", reason="the 'serve' extra (CI installs it)")

TIMEOUT_S = 8.0  # the server's --timeout: normal requests here take < 2 s, the 504 test's ~15 s
BATCH = 4
MAX_ONGOING, MAX_QUEUED = 4, 8  # Serve's queue bound is approximate under bursts: room for 4 at once
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, bytes]:
    """Photos of mixed sizes and kinds (1 and 4 tiles of 320x480; EXIF-rotated JPEG, RGBA and
    grayscale PNG), written to a folder for ``infer`` and kept as bytes for HTTP."""
    folder = tmp_path_factory.mktemp("serve-photos")
    out: dict[str, bytes] = {}
    for i, (h, w) in enumerate([(100, 150), (240, 320), (330, 500), (375, 500), (64, 64), (320, 480)]):
        out[f"p{i}.jpg"] = _encoded(Image.fromarray(_photo(h, w, i)), "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out["rotated.jpg"] = _encoded(Image.fromarray(_photo(200, 300, 7)), "JPEG", exif=exif)
    rgba = np.dstack([_photo(150, 260, 8), np.full((150, 260), 128, np.uint8)])
    out["alpha.png"] = _encoded(Image.fromarray(rgba, "RGBA"), "PNG")
    out["gray.png"] = _encoded(Image.fromarray(_photo(180, 200, 9)[..., 0]), "PNG")
    for name, data in out.items():
        (folder / name).write_bytes(data)
    out["_folder"] = str(folder).encode()
    return out


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            res = conn.getresponse()
            return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
        finally:
            conn.close()

    def segment(self, data: bytes, query: str = "", content_type: str = "image/jpeg", **kw):
        return self.request("POST", "/v1/segment" + query, data, {"Content-Type": content_type}, **kw)

    def metrics(self) -> str:
        return self.request("GET", "/metrics")[2].decode()


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def server(onnx_path, tmp_path_factory):
    """``fcn-deploy serve`` in a subprocess, ready (``/readyz``) before the first test."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "fcn_deploy", "serve", "--backend", "ort", "--model", str(onnx_path), "--device", "cpu",
           "--port", str(port), "--batch-size", str(BATCH), "--max-ongoing", str(MAX_ONGOING), "--max-queued",
           str(MAX_QUEUED), "--timeout", str(TIMEOUT_S), "--retry-after", "2", "--max-pixels", str(1 << 24),
           "--max-body-bytes", str(4 << 20), "--max-logits-bytes", str(8 << 20)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    srv = Server(port, proc, log)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if srv.request("GET", "/readyz", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server was not ready within 180 s: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    yield srv
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _is_json_error(body: bytes, status: int) -> str:
    """The message of a one-line JSON error body of ``status`` (asserts its form)."""
    text = body.decode()
    assert text.endswith("\n") and "\n" not in text[:-1], text
    assert "Traceback" not in text
    error = json.loads(text)["error"]
    assert error["status"] == status and error["message"] and error["code"], text
    return error["message"]


def test_masks_are_the_bytes_infer_writes(server, photos, onnx_path, tmp_path):
    from fcn_deploy.infer import run_inference
    from fcn_deploy.runners.onnxrt import OnnxRuntimeRunner

    names = [n for n in photos if not n.startswith("_")]
    # concurrently: tiles of different requests share engine batches (the rule: docs/serving.md)
    with ThreadPoolExecutor(MAX_ONGOING) as pool:
        answers = dict(zip(names, pool.map(lambda n: server.segment(photos[n]), names)))
    out = tmp_path / "infer"
    summary = run_inference([photos["_folder"].decode()], out, runner=OnnxRuntimeRunner(onnx_path),
                            batch_size=BATCH, progress=False)
    assert summary.images == len(names) and not summary.failed
    for name, (status, headers, body) in answers.items():
        assert status == 200, (name, body[:300])
        assert headers["content-type"] == "image/png"
        assert body == (out / (name.rsplit(".", 1)[0] + ".png")).read_bytes(), name
        with Image.open(io.BytesIO(body)) as mask:
            w, h = mask.size
        assert headers["x-image-size"] == f"{w}x{h}"
        assert int(headers["x-tiles"]) == (4 if name in ("p2.jpg", "p3.jpg") else 1)
        stages = dict(part.strip().split(";dur=") for part in headers["server-timing"].split(","))
        assert set(stages) == {"decode", "tiles", "engine", "stitch", "encode", "total"}
    assert Image.open(io.BytesIO(answers["rotated.jpg"][2])).size == (200, 300)  # EXIF applied, as infer


def test_json_overlay_logits_and_model(server, photos, onnx_path):
    from fcn_deploy.runners.onnxrt import OnnxRuntimeRunner
    from fcn_deploy.infer.segmenter import Segmenter
    from fcn_deploy.voc import VOC_CLASSES

    data = photos["p2.jpg"]
    status, headers, body = server.segment(data, "?output=json")
    assert status == 200 and headers["content-type"] == "application/json"
    counts = json.loads(body)
    assert (counts["width"], counts["height"], counts["tiles"]) == (500, 330, 4)
    assert [c["name"] for c in counts["classes"]] == list(VOC_CLASSES)
    mask = np.asarray(Image.open(io.BytesIO(server.segment(data)[2])))
    assert [c["pixels"] for c in counts["classes"]] == np.bincount(mask.ravel(), minlength=21)[:21].tolist()
    status, headers, body = server.segment(data, "?output=overlay")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (500, 330)
    status, headers, body = server.segment(data, "?output=logits")
    assert status == 200
    logits = np.load(io.BytesIO(body), allow_pickle=False)
    assert logits.dtype == np.float16 and logits.shape == (21, 330, 500)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    with Segmenter(OnnxRuntimeRunner(onnx_path), batch_size=BATCH) as seg:
        expected = seg.predict_logits(rgb, dtype=np.float16)
    np.testing.assert_array_equal(logits, expected)  # the averaged logits of infer --save-logits
    status, _, body = server.request("GET", "/v1/model")
    info = json.loads(body)
    assert status == 200 and info["classes"] == list(VOC_CLASSES) and len(info["colormap"]) == 21
    assert info["tile"] == {"height": 320, "width": 480} and info["precision"] == "fp32"
    assert info["artifact"] == "fcn.onnx" and len(info["sha256"]) == 64 and info["api"] == "v1"
    assert server.request("GET", "/healthz")[0] == 200
    assert json.loads(server.request("GET", "/readyz")[2]) == {"ready": True}


def _bomb(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _hostile(photos) -> list[tuple[str, tuple, int]]:
    """(what, request args for Server.request, expected status)."""
    jpg = photos["p0.jpg"]
    seg = "/v1/segment"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    return [
        ("text body", ("POST", seg, b"hello", {"Content-Type": "text/plain"}), 415),
        ("form-encoded (curl's default)", ("POST", seg, jpg, {"Content-Type": "application/x-www-form-urlencoded"}), 415),
        ("multipart", ("POST", seg, jpg, {"Content-Type": "multipart/form-data; boundary=x"}), 415),
        ("gzip encoding", ("POST", seg, jpg, {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}), 415),
        ("svg", ("POST", seg, b"<svg/>", {"Content-Type": "image/svg+xml"}), 415),
        ("not an image", ("POST", seg, b"hello world", {"Content-Type": "image/png"}), 400),
        ("empty body", ("POST", seg, b"", {"Content-Type": "image/png"}), 400),
        ("truncated jpeg", ("POST", seg, jpg[: len(jpg) // 2], {"Content-Type": "image/jpeg"}), 400),
        ("garbage after a jpeg header", ("POST", seg, jpg[:200] + os.urandom(2000), {"Content-Type": "image/jpeg"}), 400),
        ("eps (a Ghostscript plugin)", ("POST", seg, eps, {"Content-Type": "application/octet-stream"}), 400),
        ("a server path as the body", ("POST", seg, b"/etc/passwd", {"Content-Type": "application/octet-stream"}), 400),
        ("a server path as a parameter", ("POST", seg + "?image=/etc/passwd", jpg, {"Content-Type": "image/jpeg"}), 400),
        ("path traversal as the output", ("POST", seg + "?output=../../x", jpg, {"Content-Type": "image/jpeg"}), 400),
        ("output twice", ("POST", seg + "?output=json&output=mask", jpg, {"Content-Type": "image/jpeg"}), 400),
        ("bad Content-Length", ("POST", seg, jpg, {"Content-Type": "image/jpeg", "Content-Length": "abc"}), 400),
        ("decompression bomb header", ("POST", seg, _bomb(30000, 30000), {"Content-Type": "image/png"}), 413),
        ("past --max-pixels (17 MP), checked from the header", ("POST", seg, _bomb(4200, 4000), {"Content-Type": "image/png"}), 413),
        ("a 1x2,000,000 strip: within --max-pixels, past the work limit (tiles)", ("POST", seg, _encoded(
            Image.new("RGB", (2_000_000, 1)), "PNG"), {"Content-Type": "image/png"}), 413),
        ("body past --max-body-bytes", ("POST", seg, b"\0" * (5 << 20), {"Content-Type": "image/png"}), 413),
        ("logits past --max-logits-bytes", ("POST", seg + "?output=logits", _encoded(
            Image.fromarray(np.zeros((600, 600, 3), np.uint8)), "PNG"), {"Content-Type": "image/png"}), 413),
        ("GET on the segment route", ("GET", seg, None, {}), 405),
        ("unknown route", ("GET", "/v2/segment", None, {}), 404),
        ("traversal in the route", ("GET", "/v1/../../etc/passwd", None, {}), 404),
    ]


def test_hostile_requests_get_one_line_json_errors(server, photos):
    for what, args, expected in _hostile(photos):
        start = time.monotonic()
        status, headers, body = server.request(*args)
        assert status == expected, (what, status, body[:300])
        if what == "bad Content-Length":  # malformed HTTP: uvicorn refuses it before the app sees it
            assert b"Traceback" not in body and body.count(b"\n") <= 1, body
            continue
        assert headers["content-type"] == "application/json", what
        message = _is_json_error(body, expected)
        assert "/etc/passwd" not in message or "parameter" in message or "route" in message, (what, message)
        assert time.monotonic() - start < 1.0 or what.startswith("body past"), (what, "slow")
    assert server.segment(photos["p0.jpg"])[0] == 200  # still serving


def test_chunked_body_past_the_limit_is_413(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/segment")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for _ in range(6):  # 6 MiB, never declared
            conn.send(b"100000\r\n" + b"\0" * (1 << 20) + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server may answer and close before all of it is sent
    res = conn.getresponse()
    assert res.status == 413
    _is_json_error(res.read(), 413)
    conn.close()


def test_queue_full_is_503_with_retry_after(server, photos):
    n = 3 * (MAX_ONGOING + MAX_QUEUED)
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda _: server.segment(photos["p0.jpg"], timeout=60), range(n)))
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= MAX_ONGOING and statuses.count(503) >= 1, statuses
    for status, headers, body in answers:
        if status == 503:
            assert headers["retry-after"] == "2"
            assert "queue is full" in _is_json_error(body, 503)


def test_timeout_is_504_and_cancels_the_work(server):
    big = _encoded(Image.fromarray(_photo(2600, 3000, 3)), "JPEG", quality=80)  # 80 tiles: ~10-20 s of CPU
    before = _metric(server.metrics(), "fcn_deploy_serve_cancelled_total")
    start = time.monotonic()
    status, _, body = server.segment(big, timeout=60)
    took = time.monotonic() - start
    assert status == 504, body[:300]
    assert "--timeout" in _is_json_error(body, 504)
    assert took < TIMEOUT_S + 5, took
    deadline = time.monotonic() + 10
    while _metric(server.metrics(), "fcn_deploy_serve_cancelled_total") <= before:
        assert time.monotonic() < deadline, "the replica never cancelled the request's tiles"
        time.sleep(0.3)
    assert server.segment(_encoded(Image.fromarray(_photo(100, 150, 0)), "PNG"), content_type="image/png")[0] == 200


def test_a_disconnecting_client_cancels_its_work(server):
    big = _encoded(Image.fromarray(_photo(2600, 3000, 4)), "JPEG", quality=80)
    text = server.metrics()
    before = _metric(text, "fcn_deploy_serve_cancelled_total")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: "
                     + str(len(big)).encode() + b"\r\n\r\n" + big)
        time.sleep(1.5)  # the request is in the model replica now
    deadline = time.monotonic() + 10
    while _metric(server.metrics(), "fcn_deploy_serve_cancelled_total") <= before:
        assert time.monotonic() < deadline, "the disconnect did not cancel the request's tiles"
        time.sleep(0.3)
    while _metric(server.metrics(), "fcn_deploy_serve_tiles_queued") > 0:  # its remaining tiles left the queue
        assert time.monotonic() < deadline + 10, "tiles of a cancelled request stayed queued"
        time.sleep(0.3)


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parents.items() if pp == pid]
        found += kids
        todo += kids
    return found


def _replica_pid(server, kind: str) -> int:
    for pid in _descendants(server.proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if cmd.startswith(f"ray::ServeReplica:fcn-deploy:{kind}"):
            return pid
    raise AssertionError(f"no {kind} replica among the server's processes")


def test_a_killed_replica_is_restarted_and_no_request_hangs(server, photos):
    victim = _replica_pid(server, "SegmentModel")
    data = photos["p3.jpg"]

    def client(_):
        start = time.monotonic()
        try:
            status, _, body = server.segment(data, timeout=TIMEOUT_S + 20)
        except OSError as exc:
            return "error", repr(exc), time.monotonic() - start
        return status, body, time.monotonic() - start

    with ThreadPoolExecutor(MAX_ONGOING) as pool:
        futures = [pool.submit(client, i) for i in range(MAX_ONGOING)]
        time.sleep(0.8)  # load in flight
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        results = [f.result() for f in futures]
    for status, body, took in results:
        assert status in (200, 503, 504), (status, body)  # retried once: 200, else a JSON 5xx
        assert took < TIMEOUT_S + 5, took  # none hangs past its timeout
        if status != 200:
            _is_json_error(body, status)
    while True:
        status = server.segment(photos["p0.jpg"], timeout=TIMEOUT_S + 20)[0]
        if status == 200:
            break
        assert time.monotonic() - killed_at < 120, "no replica came back"
        time.sleep(0.5)
    recovered = time.monotonic() - killed_at
    assert _replica_pid(server, "SegmentModel") != victim
    print(f"\nkilled replica {victim}: statuses {[r[0] for r in results]}, served again {recovered:.1f} s after the kill")


def test_a_burst_of_bad_requests_each_get_their_status_and_the_server_stays(server, photos):
    """A short version of ``benchmarks/serve_hostile.py`` (1,000 requests, memory): 200 here."""
    cases = _hostile(photos)
    cases = [c for c in cases if not c[0].startswith("body past")]  # 5 MiB each: the benchmark sends them
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: (cases[i % len(cases)], server.request(*cases[i % len(cases)][1])), range(200)))
    for (what, _, expected), (status, headers, body) in got:
        assert status == expected, (what, status, body[:200])
        if what != "bad Content-Length":
            _is_json_error(body, expected)
    text = server.metrics()
    assert _metric(text, "fcn_deploy_serve_requests_total", status="415") >= 40
    assert server.segment(photos["p1.jpg"])[0] == 200
    assert "fcn_deploy_serve_request_duration_seconds_bucket" in text
    assert "fcn_deploy_serve_batch_tiles_bucket" in text and "fcn_deploy_serve_queue_depth" in text


def test_sigterm_drains_then_exits_143(server, photos):
    """Last: stops the module's server."""
    data = photos["p3.jpg"]
    with ThreadPoolExecutor(2) as pool:
        inflight = pool.submit(server.segment, data, timeout=30)
        time.sleep(0.4)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            late = server.segment(photos["p0.jpg"], timeout=30)
        except OSError:  # already closed: as good as refused
            late = None
        status, _, body = inflight.result()
    assert status == 200, body[:300]  # drained: the request in flight was answered
    if late is not None:  # a request after the signal is refused while the others drain
        assert late[0] == 503 and "shutting down" in _is_json_error(late[2], 503), late
    assert server.proc.wait(60) == 143
    log = server.log.read_text()
    assert "drained" in log and "terminated (SIGTERM)" in log and "Traceback" not in log
