"""The large-upload case of bench_serving.py (issue 32): the server's peak RSS while N clients upload worst-case
images to /api/predict at once.

Worst cases: a 7000x7000 RGBA PNG (a ~200 KB file, 196 MB of pixels: the issue's attack), a 7000x7000 baseline
JPEG, the same as a progressive JPEG (libjpeg keeps every DCT coefficient of a progressive file, whatever the output
scale) and as a progressive 4:4:4 JPEG (more coefficients than the default decode budget: refused with 413). Each
burst sends N copies at once from N threads (standard library HTTP); the server's peak RSS is its VmHWM, reset
before each burst (/proc/PID/clear_refs), and its RSS is read again after the burst to see memory given back.

The stated bound (docs/serving.md): peak RSS <= RSS at rest + --decode-memory-mb + N x the upload's size (each
request holds its file's bytes while it waits its turn) + 64 MiB (parser buffers, threads, allocator slack).
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np

from tasks.promote.serving_check import ServerProcess, multipart

SLACK_MIB = 64


def worst_images(folder: Path) -> dict[str, Path]:
    """The worst-case uploads, written once into `folder`."""
    from PIL import Image

    n = 7000
    files = {"PNG 7000x7000 RGBA": folder / "rgba.png", "JPEG 7000x7000 baseline": folder / "baseline.jpg",
             "JPEG 7000x7000 progressive": folder / "progressive.jpg",
             "JPEG 7000x7000 progressive 4:4:4": folder / "progressive444.jpg"}
    if all(p.exists() for p in files.values()):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (n, n), (200, 40, 40, 128)).save(files["PNG 7000x7000 RGBA"])
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (n // 100, n // 100, 3), dtype=np.uint8)).resize((n, n))
    photo.save(files["JPEG 7000x7000 baseline"], quality=90)
    photo.save(files["JPEG 7000x7000 progressive"], quality=90, progressive=True)
    photo.save(files["JPEG 7000x7000 progressive 4:4:4"], quality=90, progressive=True, subsampling=0)
    return files


def memory_mib(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
        return True
    except OSError:
        return False


def burst(server: ServerProcess, name: str, data: bytes, clients: int) -> dict:
    """`clients` uploads of the same file at once: their statuses and seconds."""
    body, content_type = multipart([(name, data)])
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def send():
        started = time.perf_counter()
        try:
            status = server.request("POST", "/api/predict", body, {"Content-Type": content_type}, timeout=900).status
        except OSError:
            status = 0
        with lock:
            results.append((status, time.perf_counter() - started))

    threads = [threading.Thread(target=send) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = sorted(s for _, s in results)
    return {"statuses": {str(c): sum(1 for s, _ in results if s == c) for c in sorted({s for s, _ in results})},
            "p50_s": round(seconds[len(seconds) // 2], 2), "max_s": round(seconds[-1], 2)}


def measure_uploads(model: Path, folder: Path, clients: list[int], server_args: list[str], name: str) -> dict:
    """Each worst-case image x each client count against one server; peak and after-burst RSS per burst."""
    from deploy.settings import Settings

    budget = getattr(Settings(), "decode_memory_mb", None)  # None: a server without a decode budget (before 32)
    if "--decode-memory-mb" in server_args:
        budget = int(server_args[server_args.index("--decode-memory-mb") + 1])
    images = worst_images(folder)
    rows = []
    with ServerProcess(model, "--poll-s", "0", "--no-access-log", *server_args, name=name) as server:
        server.wait_ready(300)
        small = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (300, 300), (90, 90, 90)).save(small, "PNG")
        burst(server, "warm.png", small.getvalue(), 2)
        rest = memory_mib(server.proc.pid)["VmRSS"]
        for label, path in images.items():
            data = path.read_bytes()
            for n in clients:
                exact = reset_peak(server.proc.pid)
                before = memory_mib(server.proc.pid)
                result = burst(server, path.name, data, n)
                after = memory_mib(server.proc.pid)
                bound = (rest + budget + n * len(data) / 2**20 + SLACK_MIB) if budget is not None else None
                rows.append({"image": label, "file_mb": round(len(data) / 1e6, 2), "clients": n, **result,
                             "rss_before_mib": round(before["VmRSS"], 1), "peak_rss_mib": round(after["VmHWM"], 1),
                             "rss_after_mib": round(after["VmRSS"], 1), "peak_is_per_burst": exact,
                             "bound_mib": round(bound, 1) if bound is not None else None,
                             "within_bound": bound is None or after["VmHWM"] <= bound})
        exit_code = server.stop()
    server.cleanup()
    return {"decode_memory_mb": budget, "rss_at_rest_mib": round(rest, 1), "slack_mib": SLACK_MIB,
            "server_exit_code": exit_code, "bursts": rows}


def print_uploads(result: dict) -> None:
    budget = result["decode_memory_mb"]
    print(f"\nLarge uploads to /api/predict: RSS at rest {result['rss_at_rest_mib']:.0f} MiB, decode budget "
          f"{budget if budget is not None else 'none'} MiB; bound = rest + budget + N x file + {result['slack_mib']} MiB")
    head = (f"{'image':<34}{'file MB':>8}{'N':>4}{'statuses':>16}{'p50 s':>7}{'max s':>7}{'peak MiB':>10}"
            f"{'after MiB':>10}{'bound MiB':>10}{'ok':>4}")
    print(head)
    print("-" * len(head))
    for r in result["bursts"]:
        statuses = ",".join(f"{k}x{v}" for k, v in r["statuses"].items())
        bound = f"{r['bound_mib']:.0f}" if r["bound_mib"] is not None else "-"
        print(f"{r['image']:<34}{r['file_mb']:>8.2f}{r['clients']:>4}{statuses:>16}{r['p50_s']:>7.1f}{r['max_s']:>7.1f}"
              f"{r['peak_rss_mib']:>10.0f}{r['rss_after_mib']:>10.0f}{bound:>10}{'yes' if r['within_bound'] else 'NO':>4}")
