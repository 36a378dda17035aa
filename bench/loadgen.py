"""A small closed-loop HTTP/1.1 load generator on asyncio streams (standard library only).

Each client keeps one keep-alive connection and sends the same request again as soon as the previous
answer is complete; latency is from the first byte sent to the last byte read. It is deliberately
minimal (a prepared request, Content-Length responses) so that on a 2-core machine the load generator
takes as little CPU from the server as possible. Bounded: it stops after `duration_s` or
`max_requests`, whichever comes first, and only talks to the loopback address it is given.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, measured requests only
    statuses: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, version) per answer

    def count(self, status: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


def request_bytes(path: str, body: bytes, headers: dict[str, str], host: str, port: int) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}", "Connection: keep-alive"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


def _version(body: bytes) -> str:
    i = body.find(b'"model_version":"')
    if i < 0:
        return "?"
    j = body.find(b'"', i + 17)
    return body[i + 17:j].decode()


async def _client(host: str, port: int, raw: bytes, tally: Tally, started: float, measure_from: float,
                  stop_at: float, budget: list[int]) -> None:
    reader = writer = None
    while time.perf_counter() < stop_at and budget[0] > 0:
        budget[0] -= 1
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            t0 = time.perf_counter()
            writer.write(raw)
            await writer.drain()
            status, body = await _read_response(reader)
            t1 = time.perf_counter()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            tally.count("error")
            tally.errors.append(repr(exc))
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        tally.count(str(status))
        version = _version(body[:512])
        tally.timeline.append((round(t1 - started, 3), version if status == 200 else f"HTTP {status}"))
        if t0 >= measure_from:
            tally.latencies.append(t1 - t0)
            tally.versions[version] = tally.versions.get(version, 0) + 1
    if writer is not None:
        writer.close()


async def run_load(host: str, port: int, path: str, body: bytes, headers: dict[str, str], clients: int,
                   duration_s: float, warmup_s: float = 1.0, max_requests: int = 200_000, during=None) -> dict:
    """`clients` closed-loop clients for `warmup_s + duration_s`; stats over the measured `duration_s`.
    `during(elapsed_s)` (optional, async) runs beside the load, e.g. to promote a model mid-run."""
    raw = request_bytes(path, body, headers, host, port)
    tally = Tally()
    started = time.perf_counter()
    measure_from, stop_at = started + warmup_s, started + warmup_s + duration_s
    budget = [max_requests]
    tasks = [asyncio.create_task(_client(host, port, raw, tally, started, measure_from, stop_at, budget))
             for _ in range(clients)]
    side = asyncio.create_task(during(started)) if during else None
    await asyncio.gather(*tasks)
    side_result = await side if side else None
    elapsed = min(time.perf_counter(), stop_at) - measure_from
    lat = np.array(tally.latencies) * 1000 if tally.latencies else np.zeros(1)
    measured = len(tally.latencies)
    ok = tally.statuses.get("200", 0)
    return {
        "clients": clients, "seconds": round(elapsed, 2), "requests": measured, "requests_per_s": measured / elapsed,
        "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
        "statuses": tally.statuses, "errors": sum(v for k, v in tally.statuses.items() if k != "200"),
        "ok": ok, "error_samples": tally.errors[:5], "versions": tally.versions,
        "side": side_result, "timeline": tally.timeline if during else None,
    }
