"""Latency of `GET /api/v1/daemon` over the unix socket, against a bare-waitress peer.

Starts the real daemon (passthrough of config/sample-tree on a temporary FUSE
mount) and, in the same run, a peer: waitress on a unix socket with a WSGI app
that returns a constant body of the same size, i.e. the HTTP server floor with
no actors and no routing. Both are asked N times over one keep-alive connection.
Prints p50/p99 of each and their ratios. Needs root and /dev/fuse.

    .venv/bin/python bench/api_latency.py [--requests 2000]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from waitress.server import create_server

from nydus_actors._lib.uds_http import UdsHttpClient

ROOT = Path(__file__).resolve().parent.parent


def measure(sock: str, path: str, count: int) -> list[float]:
    client = UdsHttpClient(sock, timeout=10)
    for _ in range(50):  # warm-up
        client.request("GET", path)
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        status, _, _ = client.request("GET", path)
        samples.append((time.perf_counter() - start) * 1000)
        assert status == 200, status
    client.close()
    return samples


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def wait_for(path: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"daemon exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear")
        time.sleep(0.02)


def run_peer(sock: str, body: bytes) -> tuple[object, threading.Thread]:
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    server = create_server(app, unix_socket=sock, unix_socket_perms="600", threads=4, ident="peer")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mnt = Path(tmp, "mnt")
        mnt.mkdir()
        sock = str(Path(tmp, "api.sock"))
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nydus_actors",
                "--shared-dir",
                str(ROOT / "config/sample-tree"),
                "--mountpoint",
                str(mnt),
                "--apisock",
                sock,
                "--log-level",
                "warn",
            ],
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(sock, daemon)
            ours = measure(sock, "/api/v1/daemon", args.requests)
            _, _, body = UdsHttpClient(sock).request("GET", "/api/v1/daemon")
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
        peer_sock = str(Path(tmp, "peer.sock"))
        server, _ = run_peer(peer_sock, body)
        wait_for(peer_sock)
        peer = measure(peer_sock, "/", args.requests)
        server.close()

    rows = []
    for name, samples in (
        ("nydus-actors GET /api/v1/daemon", ours),
        ("peer: bare waitress, same body", peer),
    ):
        rows.append((name, statistics.median(samples), percentile(samples, 99)))
    print(f"{args.requests} requests each over one keep-alive unix-socket connection")
    for name, p50, p99 in rows:
        print(f"  {name:36s} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms")
    print(
        f"  ratio ours/peer                      p50 {rows[0][1] / rows[1][1]:7.2f} x   "
        f"p99 {rows[0][2] / rows[1][2]:7.2f} x"
    )
    print(f"  target p50 <= 2 ms: {'met' if rows[0][1] <= 2.0 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
