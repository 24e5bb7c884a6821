"""Prediction API over HTTP: `btc-anomaly api` vs a naive FastAPI baseline, same model, same run.

Setup (in a temporary folder, 127.0.0.1 only): a local MLflow server, the bundled sample as a Delta table,
``train`` → champion. Then, each as its own uvicorn process:

* ``ours``: ``python -m btc_anomaly.cli api`` (compiled scorer, one feature call per request or per
  burst of concurrent requests, reasons): 1 worker with the numpy and with the numba forest evaluator
  (``api_scorer_backend``), and 2 workers.
* ``naive``: the obvious service: loads ``models:/<name>@champion`` with
  ``mlflow.pyfunc.load_model``, takes the sklearn IsolationForest out of it and per request builds a
  pandas frame, calls ``compute_features``, ``predict`` and ``score_samples`` (sklearn scores twice), and
  answers through FastAPI's response model (``bench/naive_api.py``). 1 worker.

Cases (the body is a real sample transaction; batches are 1,000 sample transactions):

* ``single, sequential``: one keep-alive connection, one request at a time (3,000 after 300 warm-up),
  client-side latency percentiles; a raw-socket client so the client adds ~20 µs, not an HTTP library's ms.
* ``batch 1,000``: 40 sequential requests of 1,000 canonical transactions (and of 1,000 8-field bodies);
  3 for the naive service, which needs ~10 s for one.
* ``throughput``: ``wrk`` (16 connections, 1 thread, 15 s) when installed, else the asyncio client;
  requests/s and wrk's latency percentiles. The load generator shares the 2 cores with the server.
* ``sustained``: open-loop 500 requests/s for 60 s (latency measured from each request's scheduled send
  time, so queueing counts), errors = non-200 answers + transport errors.
* ``RSS``: resident memory of each server process after the load (USS = memory unique to it).

    python -m bench.bench_api [--quick | --smoke] [--mlflow-uri URL]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import orjson

from bench.naive_api import NAIVE_ENV
from bench.run_all import speed_probe_ms
from btc_anomaly.config import PROJECT_ROOT, Settings
from btc_anomaly.runtime.kafka_broker import free_port
from btc_anomaly.runtime.mlflow_server import MlflowServer

SAMPLE = PROJECT_ROOT / "data" / "sample" / "transactions.jsonl.gz"


# --- processes -----------------------------------------------------------------------------------------


@contextmanager
def _process(
    cmd: list[str], env: dict[str, str], log: Path, health: str, timeout_s: float = 180
) -> Iterator[int]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2:5]} exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(health, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{health} not ready: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this context started: server and its workers
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTC_ANOMALY_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env.update(extra)
    return env


def ours(settings: Settings, tmp: Path, workers: int, backend: str = "numpy") -> Any:
    port = free_port()
    env = _clean_env(
        {
            "BTC_ANOMALY_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
            "BTC_ANOMALY_MODEL_NAME": settings.model_name,
            "BTC_ANOMALY_LAKE_ROOT": str(settings.lake_dir),
            "BTC_ANOMALY_STATE_DIR": str(settings.state_dir),
            "BTC_ANOMALY_API_SCORER_BACKEND": backend,
        }
    )
    cmd = [sys.executable, "-m", "btc_anomaly.cli", "api", "--port", str(port), "--workers", str(workers)]
    return port, _process(cmd, env, tmp / f"ours-{workers}-{backend}.log", f"http://127.0.0.1:{port}/ready")


def naive(settings: Settings, tmp: Path) -> Any:
    port = free_port()
    env = _clean_env(
        {
            NAIVE_ENV: f"models:/{settings.model_name}@champion",
            "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    cmd = [sys.executable, "-m", "uvicorn", "bench.naive_api:naive_app", "--factory", "--port", str(port)]
    cmd += ["--no-access-log", "--log-level", "warning"]
    return port, _process(cmd, env, tmp / "naive.log", f"http://127.0.0.1:{port}/health")


def _rss(pid: int) -> list[tuple[float, float]]:
    """(RSS MB, USS MB) of the server process and every child that is a Python worker."""
    import psutil

    root = psutil.Process(pid)
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            mem = p.memory_full_info()
        except psutil.Error:
            continue
        if mem.rss > 50 * 2**20:  # skip uvicorn's tiny helper processes (resource tracker)
            out.append((mem.rss / 2**20, mem.uss / 2**20))
    return out


# --- clients -------------------------------------------------------------------------------------------


def _request(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _read_response(recv: Any) -> tuple[int, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = recv()
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head[9:12])
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(rest) < length:
        chunk = recv()
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    return status, rest[:length]


def sequential(port: int, request: bytes, n: int, warmup: int) -> tuple[list[float], int]:
    """Latencies (s) of ``n`` requests on one keep-alive connection, and the number of non-200 answers."""
    times, errors = [], 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def recv() -> bytes:
            return s.recv(1 << 20)

        for i in range(n + warmup):
            t0 = time.perf_counter()
            s.sendall(request)
            status, _ = _read_response(recv)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                errors += status != 200
    return times, errors


async def _open_loop(
    port: int, request: bytes, rate: float, duration_s: float, conns: int
) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5
    total = int(rate * duration_s)

    async def worker(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in range(k, total, conns):
                scheduled = start + i / rate
                delay = scheduled - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                    await reader.readexactly(length)
                    errors += int(head[9:12]) != 200
                except (OSError, asyncio.IncompleteReadError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                latencies.append(loop.time() - scheduled)
        finally:
            writer.close()

    await asyncio.gather(*(worker(k) for k in range(conns)))
    return latencies, errors


def open_loop(
    port: int, request: bytes, rate: float, duration_s: float, conns: int = 16
) -> tuple[list[float], int]:
    return asyncio.run(_open_loop(port, request, rate, duration_s, conns))


def closed_loop(
    port: int, request: bytes, duration_s: float, conns: int = 16
) -> tuple[float, list[float], int]:
    """Fallback for wrk: as fast as ``conns`` connections go. (req/s, latencies, errors)."""

    async def run() -> tuple[float, list[float], int]:
        latencies: list[float] = []
        errors = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + duration_s

        async def worker() -> None:
            nonlocal errors
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            while loop.time() < end:
                t0 = loop.time()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                errors += int(head[9:12]) != 200
                latencies.append(loop.time() - t0)
            writer.close()

        t0 = loop.time()
        await asyncio.gather(*(worker() for _ in range(conns)))
        return len(latencies) / (loop.time() - t0), latencies, errors

    return asyncio.run(run())


def wrk(port: int, path: str, body: bytes, duration_s: int, tmp: Path, conns: int = 16) -> dict[str, Any]:
    body_file = tmp / f"wrk-body-{uuid.uuid4().hex[:6]}.json"
    body_file.write_bytes(body)
    script = tmp / "wrk-post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*a")\nf:close()\n'
    )
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{duration_s}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
        check=True,
    ).stdout

    def latency(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"req/s": rps, "p50 ms": latency("50"), "p99 ms": latency("99"), "errors": errors}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def _row(case: str, target: str, times: list[float] | None = None, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case, "target": target}
    if times:
        row.update({"p50 ms": _pct(times, 0.5), "p90 ms": _pct(times, 0.9), "p99 ms": _pct(times, 0.99)})
    row.update(extra)
    return row


# --- main ----------------------------------------------------------------------------------------------


def _champion(stack: ExitStack, tmp: Path, mlflow_uri: str | None = None) -> Settings:
    import pyarrow as pa
    from deltalake import write_deltalake

    from btc_anomaly.model.train import train
    from btc_anomaly.schema import Transaction, arrow_schema

    if mlflow_uri is None:
        server = MlflowServer(data_dir=tmp / "mlflow", port=free_port())
        server.start(timeout_s=180)
        stack.callback(server.stop)
        mlflow_uri = server.url
    rows = [
        Transaction.model_validate_json(line).model_dump()
        for line in gzip.decompress(SAMPLE.read_bytes()).splitlines()
    ]
    write_deltalake(str(tmp / "lake" / "transactions"), pa.Table.from_pylist(rows, schema=arrow_schema()))
    settings = Settings(
        state_dir=tmp / "state",
        lake_root=tmp / "lake",
        mlflow_tracking_uri=mlflow_uri,
        model_name=f"bench-api-{uuid.uuid4().hex[:6]}",
    )
    result = train(settings, decided_by="bench", progress=False)
    if result.decision is None or not result.decision.promoted:
        raise RuntimeError(f"the bench champion was not promoted: {result.decision}")
    return settings


def main(quick: bool = False, smoke: bool = False, mlflow_uri: str | None = None) -> list[dict[str, Any]]:
    """``smoke``: every case at a tiny size, batches of 20, the numba server left out (its JIT warm-up
    is most of its cost): that the benchmark runs, not its figures. ``mlflow_uri``: a running MLflow
    server to register the champion in instead of starting one."""
    records = [orjson.loads(line) for line in gzip.decompress(SAMPLE.read_bytes()).splitlines()]
    one = orjson.dumps(records[len(records) // 2])
    batch_n = 20 if smoke else 1000
    batch = orjson.dumps(records[:batch_n])
    summary = orjson.dumps(
        [
            {
                "hash": r["hash"],
                "size": r["size"],
                "weight": r["weight"],
                "fee": r["fee"],
                "inputs_count": r["input_count"],
                "outputs_count": r["output_count"],
                "input_value": r["input_value"],
                "output_value": r["output_value"],
            }
            for r in records[:batch_n]
        ]
    )
    n_single, warm = (20, 5) if smoke else (500, 100) if quick else (3000, 300)
    n_batch = 2 if smoke else 10 if quick else 40
    wrk_s = 1 if smoke else 5 if quick else 15
    sustained_s = 1 if smoke else 10 if quick else 60
    configs = ((1, "numpy"), (2, "numpy")) if smoke else ((1, "numpy"), (1, "numba"), (2, "numpy"))
    have_wrk = shutil.which("wrk") is not None
    rows: list[dict[str, Any]] = []

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        settings = _champion(stack, tmp, mlflow_uri)
        load_at_start, probe_at_start = os.getloadavg()[0], speed_probe_ms()

        def throughput(port: int, path: str, target: str) -> None:
            if have_wrk:
                result = wrk(port, path, one, wrk_s, tmp)
                rows.append(_row(f"throughput, wrk 16 conn {wrk_s}s", target, **result))
            else:
                rps, times, errors = closed_loop(port, _request(path, one), wrk_s)
                rows.append(
                    _row(
                        f"throughput, asyncio 16 conn {wrk_s}s",
                        target,
                        times,
                        **{"req/s": rps, "errors": errors},
                    )
                )

        # naive baseline, 1 worker
        port, proc = naive(settings, tmp)
        with proc as pid:
            times, errors = sequential(port, _request("/predict", one), n_single, warm)
            rows.append(_row("single tx, sequential keep-alive", "naive (1 worker)", times, errors=errors))
            # ~10 s per request (sklearn per row): a few are enough.
            times, errors = sequential(port, _request("/predict/batch", batch), 1 if smoke else 3, 1)
            rows.append(_row(f"batch {batch_n:,} canonical", "naive (1 worker)", times, errors=errors))
            throughput(port, "/predict", "naive (1 worker)")
            rows.append(_row("RSS after load", "naive (1 worker)", **_mem(_rss(pid))))

        for workers, backend in configs:
            port, proc = ours(settings, tmp, workers, backend)
            with proc as pid:
                target = f"ours ({workers} worker{'s' if workers > 1 else ''}, {backend})"
                times, errors = sequential(port, _request("/predict", one), n_single, warm)
                rows.append(_row("single tx, sequential keep-alive", target, times, errors=errors))
                if workers == 1:
                    times, errors = sequential(port, _request("/predict", batch), n_batch, 3)
                    rows.append(_row(f"batch {batch_n:,} canonical", target, times, errors=errors))
                    times, errors = sequential(port, _request("/predict", summary), n_batch, 3)
                    rows.append(_row(f"batch {batch_n:,} 8-field", target, times, errors=errors))
                throughput(port, "/predict", target)
                if workers == 2:
                    times, errors = open_loop(port, _request("/predict", one), 500, sustained_s)
                    rows.append(
                        _row(
                            f"sustained 500 req/s, {sustained_s}s",
                            target,
                            times,
                            **{"requests": len(times), "errors": errors},
                        )
                    )
                rows.append(_row("RSS after load", target, **_mem(_rss(pid))))
        rows.append(
            {
                "case": f"machine: {os.cpu_count()} CPUs, 1-min load average {load_at_start:.1f} at the start, "
                f"{os.getloadavg()[0]:.1f} at the end (other jobs share the CPUs); speed probe (fixed Python "
                f"loop) {probe_at_start:.0f} ms at the start, {speed_probe_ms():.0f} ms at the end"
            }
        )
    return rows


def _mem(procs: list[tuple[float, float]]) -> dict[str, Any]:
    return {
        "RSS MB / process": " + ".join(f"{r:.0f}" for r, _ in procs),
        "USS MB / process": " + ".join(f"{u:.0f}" for _, u in procs),
    }


if __name__ == "__main__":
    from bench.run_all import format_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Short runs (a few minutes).")
    parser.add_argument("--smoke", action="store_true", help="Tiny runs: that it works, not figures.")
    parser.add_argument("--mlflow-uri", help="a running MLflow server to use instead of starting one")
    args = parser.parse_args()
    print(format_table(main(args.quick, args.smoke, args.mlflow_uri)))
