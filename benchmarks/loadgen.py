"""A lean HTTP/1.1 load generator: N keep-alive connections, one request in flight on each.

Written on raw asyncio streams (uvloop when installed) so that the client, not
the sidecar, is never the bottleneck of a one-record-per-request test: a
general-purpose client (httpx, http.client) spends ~50-100 us of CPU per
request, as much as the server. Runs in a child process, pinned to its own core.

    from benchmarks.loadgen import run_load
    result = run_load(url, batch=100, windows=[0.5, 2, 2], connections=8)  # -> {"windows": [...], ...}

Connection k sends run ``{prefix}-{k}`` (a ``common.Feed``: 64 ranks, steps advancing), each request
the next ``batch`` records of it, encoded on the fly.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import time
from typing import Any
from urllib.parse import urlparse


def _request(host: str, path: str, body: bytes, content_type: str) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    if length:
        await reader.readexactly(length)
    return status


async def _connection(host: str, port: int, feed: Any, batch: int, deadline: float,
                      counts: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    hostport = f"{host}:{port}"
    try:
        while time.perf_counter() < deadline:
            writer.write(_request(hostport, "/v1/ingest", feed.body(batch), "application/json"))
            status = await _read_response(reader)
            counts["ok" if status == 200 else "errors"] += 1
    finally:
        writer.close()


async def _main(url: str, batch: int, windows: list[float], connections: int, prefix: str,
                server_pid: int | None) -> dict[str, Any]:
    """Load for sum(windows) seconds; per window: requests answered, seconds, client and server CPU."""
    from benchmarks.common import Feed

    server = _cpu_reader(server_pid)
    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    feeds = [Feed(f"{prefix}-{k}") for k in range(connections)]
    counts = {"ok": 0, "errors": 0}
    start = time.perf_counter()
    tasks = [asyncio.ensure_future(_connection(host, port, feeds[k], batch, start + sum(windows), counts))
             for k in range(connections)]
    out = []
    for length in windows:
        t0, ok0, cpu0, server0 = time.perf_counter(), counts["ok"], time.process_time(), server()
        await asyncio.sleep(length)
        out.append({"requests": counts["ok"] - ok0, "seconds": time.perf_counter() - t0,
                    "client_cpu_seconds": time.process_time() - cpu0, "server_cpu_seconds": server() - server0})
    await asyncio.gather(*tasks)
    return {"windows": out, "errors": counts["errors"]}


def _cpu_reader(pid: int | None) -> Any:
    if pid is None:
        return lambda: 0.0
    import psutil

    proc = psutil.Process(pid)
    return lambda: sum(proc.cpu_times()[:2])


def _child(url: str, batch: int, windows: list[float], connections: int, prefix: str, core: int | None,
           server_pid: int | None, out: Any) -> None:
    from benchmarks.common import pin

    if core is not None:
        pin(core)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        pass
    out.put(asyncio.run(_main(url, batch, windows, connections, prefix, server_pid)))


def run_load(url: str, batch: int, windows: list[float], connections: int = 8, prefix: str = "load",
             core: int | None = 1, server_pid: int | None = None) -> dict[str, Any]:
    """POST batches from a child process through consecutive measurement ``windows`` (seconds each; the
    first can serve as a warm-up). Per window: requests answered with 200, seconds, the client's
    CPU seconds and (given ``server_pid``) the server's; plus the count of other answers."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(url, batch, windows, connections, prefix, core, server_pid, q))
    p.start()
    deadline = time.monotonic() + sum(windows) + 60
    while True:
        try:
            result = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not p.is_alive() or time.monotonic() > deadline:
                p.kill()
                raise RuntimeError(f"load generator failed (exit code {p.exitcode})") from None
    p.join()
    return result  # type: ignore[no-any-return]


# -- paced background load: like a live job, not as fast as possible -------------------------------

async def _paced_rank(host: str, port: int, feed: Any, period: float, phase: float, stop: Any,
                      counts: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    hostport = f"{host}:{port}"
    next_at = time.monotonic() + phase
    try:
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += period
            feed.t0 = time.time() - feed.i * feed.step_seconds  # record time = now, as a live client sends
            writer.write(_request(hostport, "/v1/ingest", feed.body(1), "application/json"))
            counts["ok" if await _read_response(reader) == 200 else "errors"] += 1
    finally:
        writer.close()


async def _paced_main(url: str, run: str, ranks: int, rate: float, stop: Any) -> dict[str, Any]:
    from benchmarks.common import Feed

    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    counts = {"ok": 0, "errors": 0}
    period = 1.0 / rate
    start = time.perf_counter()
    await asyncio.gather(*(_paced_rank(host, port, Feed(run, 1, time.time(), period, first_rank=r), period,
                                       period * r / ranks, stop, counts) for r in range(ranks)))
    return {"requests": counts["ok"], "errors": counts["errors"], "seconds": time.perf_counter() - start}


def _paced_child(url: str, run: str, ranks: int, rate: float, stop: Any, out: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    out.put(asyncio.run(_paced_main(url, run, ranks, rate, stop)))


class PacedLoad:
    """``ranks`` ranks each POSTing one record every 1/``rate`` s (one keep-alive connection per rank)
    from a child process, until ``stop()``, which returns the counts."""

    def __init__(self, url: str, run: str = "background", ranks: int = 64, rate: float = 10.0) -> None:
        ctx = mp.get_context("spawn")
        self.stop_event = ctx.Event()
        self.queue = ctx.Queue()
        self.proc = ctx.Process(target=_paced_child, args=(url, run, ranks, rate, self.stop_event, self.queue))
        self.proc.start()

    def stop(self) -> dict[str, Any]:
        self.stop_event.set()
        try:
            result = self.queue.get(timeout=30)
        except queue.Empty:
            self.proc.kill()
            raise RuntimeError(f"paced load generator failed (exit code {self.proc.exitcode})") from None
        self.proc.join()
        return result  # type: ignore[no-any-return]
