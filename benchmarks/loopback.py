"""Helpers the multi-process benchmarks share (`serve_load.py`, `federation.py`): a free port, waiting
for a server to answer, percentiles."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``xs``; None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float = 180.0) -> None:
    """Poll ``url`` until it answers below 500. Raises RuntimeError when ``proc`` exits first or
    ``timeout`` s pass."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:g} s")
