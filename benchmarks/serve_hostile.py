"""1,000 mixed bad requests against ``fcn-deploy serve``: each must get its status (400, 404, 405,
413, 415) with a one-line JSON error within 1 s; afterwards the server still answers good
requests, and the memory (RSS) of its processes (Serve's HTTP proxy, the ingress, the model
replica) is compared with its baseline, taken after a warm-up of good and bad requests.

Too slow for CI as a whole (the test suite sends 200 of them: tests/test_serve.py). A random-weight
FCN (seed 0) is exported to ONNX in a temporary folder; the server runs in this process's own
local Ray cluster.

    .venv/bin/python benchmarks/serve_hostile.py [--requests 1000] [--concurrency 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import process_of  # noqa: E402


def bomb(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def cases(jpg: bytes) -> list[tuple[str, tuple, int]]:
    seg = "/v1/segment"
    big = np.zeros((600, 600, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    return [
        ("text", ("POST", seg, b"hello", {"Content-Type": "text/plain"}), 415),
        ("form", ("POST", seg, jpg, {"Content-Type": "application/x-www-form-urlencoded"}), 415),
        ("gzip", ("POST", seg, jpg, {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}), 415),
        ("not an image", ("POST", seg, b"hello world", {"Content-Type": "image/png"}), 400),
        ("empty", ("POST", seg, b"", {"Content-Type": "image/png"}), 400),
        ("truncated", ("POST", seg, jpg[: len(jpg) // 2], {"Content-Type": "image/jpeg"}), 400),
        ("garbage", ("POST", seg, jpg[:200] + os.urandom(3000), {"Content-Type": "image/jpeg"}), 400),
        ("path body", ("POST", seg, b"/etc/passwd", {"Content-Type": "application/octet-stream"}), 400),
        ("path parameter", ("POST", seg + "?image=/etc/passwd", jpg, {"Content-Type": "image/jpeg"}), 400),
        ("bad output", ("POST", seg + "?output=x", jpg, {"Content-Type": "image/jpeg"}), 400),
        ("bomb", ("POST", seg, bomb(30000, 30000), {"Content-Type": "image/png"}), 413),
        ("past --max-pixels", ("POST", seg, bomb(8000, 6000), {"Content-Type": "image/png"}), 413),
        ("body past the limit", ("POST", seg, b"\0" * (5 << 20), {"Content-Type": "image/png"}), 413),
        ("logits past the limit", ("POST", seg + "?output=logits", buf.getvalue(), {"Content-Type": "image/png"}), 413),
        ("GET segment", ("GET", seg, None, {}), 405),
        ("unknown route", ("GET", "/v1/../../etc/passwd", None, {}), 404),
    ]


def request(port: int, method: str, path: str, body, headers) -> tuple[int, bytes, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        res = conn.getresponse()
        return res.status, res.read(), time.perf_counter() - start
    finally:
        conn.close()


def rss_mib(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --requests (RSS after each)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from fcn_deploy.export.torch_export import export_onnx
    from fcn_deploy.model import FCN, save_checkpoint
    from fcn_deploy.serve import ServeSettings
    from fcn_deploy.serve.command import start

    work = Path(tempfile.mkdtemp(prefix="serve-hostile-"))
    torch.manual_seed(0)
    save_checkpoint(work / "model.pt", FCN().eval())
    onnx = work / "export" / "fcn.onnx"
    export_onnx(work / "model.pt", onnx)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)).resize((500, 375), Image.BILINEAR)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    jpg = buf.getvalue()
    table = cases(jpg)
    lines = [f"# benchmarks/serve_hostile.py --requests {args.requests} --rounds {args.rounds} --concurrency {args.concurrency}, "
             f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, ort on CPU"]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    server = start(ServeSettings(backend="ort", model=str(onnx), device="cpu", port=args.port, max_pixels=1 << 25,
                                 max_body_bytes=4 << 20, max_logits_bytes=8 << 20))
    try:
        titles = {"proxy": "ray::ProxyActor", "ingress": "ray::ServeReplica:fcn-deploy:SegmentIngress",
                  "model": "ray::ServeReplica:fcn-deploy:SegmentModel"}
        pids = {name: process_of(title) for name, title in titles.items()}

        def good() -> int:
            return request(args.port, "POST", "/v1/segment", jpg, {"Content-Type": "image/jpeg"})[0]

        def run(n: int) -> list:
            with ThreadPoolExecutor(args.concurrency) as pool:
                return list(pool.map(lambda i: (table[i % len(table)], request(args.port, *table[i % len(table)][1])),
                                     range(n)))

        for _ in range(3):
            assert good() == 200
        run(2 * len(table))  # warm-up: every code path once, then the baseline
        time.sleep(2)
        baseline = {name: rss_mib(pid) for name, pid in pids.items()}
        for round_ in range(1, args.rounds + 1):
            start_s = time.perf_counter()
            got = run(args.requests)
            wall = time.perf_counter() - start_s
            wrong, slow, not_json = [], 0, 0
            statuses: Counter = Counter()
            for (what, _, expected), (status, body, took) in got:
                statuses[status] += 1
                if status != expected:
                    wrong.append((what, status))
                slow += took > 1.0
                try:
                    text = body.decode()
                    assert text.endswith("\n") and "\n" not in text[:-1] and "Traceback" not in text
                    assert json.loads(text)["error"]["status"] == status
                except (AssertionError, ValueError, KeyError, UnicodeDecodeError):
                    not_json += 1
            latencies = sorted(t for _, (_, _, t) in got)
            say(f"round {round_}: {len(got)} bad requests in {wall:.1f} s at concurrency {args.concurrency}: statuses "
                f"{dict(sorted(statuses.items()))}; wrong status: {len(wrong)} {wrong[:5]}; over 1 s: {slow}; "
                f"not a one-line JSON error: {not_json}; latency p50 {1000 * latencies[len(latencies) // 2]:.0f} ms, "
                f"max {1000 * latencies[-1]:.0f} ms")
            ok = [good() for _ in range(5)]
            say(f"round {round_}: good requests afterwards: {ok}")
            time.sleep(2)
            after = {name: rss_mib(pid) for name, pid in pids.items()}
            for name in pids:
                say(f"round {round_}: RSS {name:8s}: baseline {baseline[name]:.1f} MiB, after {after[name]:.1f} MiB "
                    f"({after[name] - baseline[name]:+.1f} MiB)")
    finally:
        server.close()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
