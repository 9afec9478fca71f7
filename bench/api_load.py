"""The API under load while a job trains on the same machine: p50/p99 latency of
GET /v1/jobs/{id} and GET /metrics at a fixed request rate from a separate process, and the job's
training throughput in windows with and without that load, measured side by side in one run.

Set-up: the embedded broker, `cicw-stream serve` as its own process (embedded Ray head), one
job (MLP, 784-byte uint8 records as bench/stream_train.py writes them, 1 worker) reading a
topic filled beforehand. Windows alternate: unloaded, loaded, unloaded, loaded, ... each
``--window-s`` long; the job's rate in a window is the change of its trained-records counter
(GET /v1/jobs/{id}) between the reports that open and close the window, over the time between
them as the job's driver stamped them. The load generator is open-loop: requests are sent at
their scheduled times (``--rate`` per second, alternating the two endpoints) by a pool of
threads, whatever the latency of earlier ones, so slow answers cannot lower the load.

Targets (issue 9): p99 < 50 ms for both endpoints, loaded/unloaded throughput >= 0.95.

    python bench/api_load.py                       # 200 req/s, 3 pairs of 15 s windows
    python bench/api_load.py --rate 100 --pairs 5 --window-s 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from machine_info import cpu_name  # bench/ is on sys.path when a bench script runs
from stream_train import fill_topic, load_workload

TOKEN = "api-load-admin-token-0123456789"
TARGET_P99_MS = 50.0
TARGET_RATIO = 0.95


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- the load generator (runs as its own process) ---------------------------------------------
def generate_load(url: str, job_id: str, rate: float, seconds: float, out: Path, threads: int = 16) -> None:
    """Open-loop load: request i goes out at start + i / rate; writes latencies per endpoint."""
    paths = [f"/v1/jobs/{job_id}", "/metrics"]
    total = int(rate * seconds)
    latencies: dict[str, list[float]] = {p: [] for p in paths}
    errors: list[str] = []
    lateness: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.5

    def worker(k: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as client:
            for i in range(k, total, threads):
                due = start + i / rate
                if (wait := due - time.perf_counter()) > 0:
                    time.sleep(wait)
                path = paths[i % len(paths)]
                sent = time.perf_counter()
                try:
                    status = client.get(path).status_code
                except httpx.HTTPError as exc:
                    status, err = 0, f"{type(exc).__name__}: {exc}"
                took = time.perf_counter() - sent
                with lock:
                    lateness.append(sent - due)
                    if status == 200:
                        latencies[path].append(took)
                    else:
                        errors.append(f"{path}: {status or err}")

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    out.write_text(json.dumps({"latencies": latencies, "errors": errors[:20], "error_count": len(errors),
                               "sent": total, "elapsed_s": elapsed, "median_lateness_s": statistics.median(lateness)}))


# --- the benchmark ------------------------------------------------------------------------------
def trained(client: httpx.Client, job_id: str) -> tuple[int, datetime, dict[str, Any]]:
    """Records trained by the job's latest report, when its driver received that report, and the job."""
    job = client.get(f"/v1/jobs/{job_id}").json()
    at = job["progress"]["last_report_at"]
    return int(job["progress"]["records"]), datetime.fromisoformat(at) if at else datetime.now(UTC), job


def window(client: httpx.Client, job_id: str, seconds: float, load: subprocess.Popen[bytes] | None) -> float:
    """The job's records/s over about ``seconds`` (while ``load`` runs, if given), between two of its
    reports: counters and times both come from the job's side, so how often the service stores
    reports (and how loaded it is) does not blur the window."""
    r0, t0, _ = trained(client, job_id)
    time.sleep(seconds)
    r1, t1, job = trained(client, job_id)
    if load is not None:
        load.wait()
    # The embedded broker's high watermark trails the end, so one partition's lag can read 0 while
    # records remain; the topic is dry when the total is.
    lag = job["progress"]["lag"]
    if job["state"] != "RUNNING" or not lag:
        raise RuntimeError(f"the job is {job['state']} with lag {lag}: the topic ran dry (give more --records) "
                           f"or the job failed: {job['reason']}")
    return (r1 - r0) / (t1 - t0).total_seconds()


def _service_process_class() -> type:
    """tests/service/service_process.py's ServiceProcess, the wrapper the end-to-end tests use
    (loaded by path: putting tests/ on sys.path would shadow the service package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tests" / "service" / "service_process.py"
    spec = importlib.util.spec_from_file_location("service_process", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ServiceProcess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--pairs", type=int, default=3, help="unloaded/loaded window pairs")
    parser.add_argument("--records", type=int, default=1_200_000,
                        help="records in the topic; they must outlast the run (the job reads ~8k/s here)")
    parser.add_argument("--load", nargs=4, metavar=("URL", "JOB", "SECONDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        url, job_id, seconds, out = args.load
        generate_load(url, job_id, args.rate, float(seconds), Path(out))
        return 0

    from workers.kafka.broker import EmbeddedBroker

    ServiceProcess = _service_process_class()

    tmp = Path(tempfile.mkdtemp(prefix="api-load-"))
    broker = EmbeddedBroker().start()
    service = ServiceProcess(tmp / "service", f"admin:{TOKEN}", ray_num_cpus=2)
    (tmp / "service").mkdir()
    try:
        workload = load_workload("mlp", args.records, "auto")
        topic = fill_topic(broker.bootstrap, workload, "api-load")
        service.start()
        spec = {"job_id": "api-load", "model": {"name": "mlp"}, "scaling": {"num_workers": 1},
                "source": {"bootstrap_servers": broker.bootstrap, "topic": topic},
                "codec": workload.codec.model_dump(mode="json"),
                "cicw": {"burn_in_steps": 0}, "checkpoint": {"storage_path": str(tmp / "ckpt")}}
        client = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        client.post("/v1/jobs", json=spec).raise_for_status()
        deadline = time.monotonic() + 120
        while trained(client, "api-load")[0] == 0:  # past start-up: Ray workers up, first reports in
            if time.monotonic() > deadline:
                raise RuntimeError(f"the job did not start: {client.get('/v1/jobs/api-load').text}")
            time.sleep(1)
        time.sleep(args.window_s / 2)  # warm-up
        unloaded, loaded, results = [], [], []
        for pair in range(args.pairs):
            unloaded.append(window(client, "api-load", args.window_s, None))
            out = tmp / f"load-{pair}.json"
            load = subprocess.Popen([sys.executable, __file__, "--rate", str(args.rate), "--load", service.url,
                                     "api-load", str(args.window_s), str(out)], env=os.environ.copy())
            time.sleep(0.5)  # the generator starts its clock 0.5 s after it is ready
            loaded.append(window(client, "api-load", args.window_s, load))
            results.append(json.loads(out.read_text()))
            print(f"pair {pair + 1}: unloaded {unloaded[-1]:,.0f} rec/s, loaded {loaded[-1]:,.0f} rec/s "
                  f"({loaded[-1] / unloaded[-1]:.3f}), {results[-1]['sent'] / results[-1]['elapsed_s']:.0f} req/s, "
                  f"{results[-1]['error_count']} errors", flush=True)
        client.post("/v1/jobs/api-load/stop", json={"reason": "benchmark over"})
    finally:
        service.kill()
        from service.core.ray_head import stop_local_head

        stop_local_head(tmp / "service" / "ray")
        broker.stop()

    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} CPUs; job: mlp, 1 worker, {workload.source}; "
          f"load: {args.rate:.0f} req/s for {args.window_s:.0f} s x {args.pairs}")
    for path in ("/v1/jobs/{id}", "/metrics"):
        key = "/metrics" if path == "/metrics" else "/v1/jobs/api-load"
        lat = [x * 1000 for r in results for x in r["latencies"][key]]
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        print(f"GET {path:<15} n={len(lat):>6}  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  "
              f"(target p99 < {TARGET_P99_MS:.0f} ms: {'met' if p99 < TARGET_P99_MS else 'NOT met'})")
    ratio = statistics.median(loaded) / statistics.median(unloaded)
    print(f"job throughput: unloaded median {statistics.median(unloaded):,.0f} rec/s, loaded median "
          f"{statistics.median(loaded):,.0f} rec/s, ratio {ratio:.3f} "
          f"(target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
