"""Dashboard API latency over a large metrics.jsonl (DESIGN §11): prints a table, appends JSON to bench/results/.

  python bench/dashboard.py [--lines 1000000] [--repeats 5]

Measures, through real HTTP requests to a dashboard server that reads the file in the background from its start:
the page's first request (sent at once; answered with the lines read so far and `loading` while the first read
goes on), the time from server start to the first complete answer (the whole first read, polled as the page does),
a repeated answer (served from the series cache), an answer after one appended line (read by the background
thread, then downsampled again), and the status endpoint. CPU time is reported next to wall time because a shared
machine's other jobs stretch the latter; max RSS is that of the whole benchmark process (file writing included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from echo_jax import dashboard  # noqa: E402 - needs the repository root on the path first

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dashboard.jsonl")
KEYS = "loss,lr,grad_norm,samples_per_sec,steps_per_sec,mfu,data_wait,eval_loss,skipped_samples"


def _write_metrics(path: str, lines: int) -> int:
  """A metrics.jsonl shaped like the trainer's (DESIGN §7), one eval line every 1000 steps."""
  rnd = random.Random(0)
  t0 = time.time() - lines
  with open(path, "w") as f:
    batch = []
    for step in range(lines):
      batch.append(json.dumps({
          "step": step, "time": t0 + step, "loss": 2.0 / (1 + step * 1e-4) + rnd.random() * 0.05, "lr": 1e-4,
          "grad_norm": 1.0 + rnd.random(), "samples_seen": step * 256, "samples_per_sec": 210.0 + rnd.random(),
          "steps_per_sec": 0.82, "step_time": 1.2, "mfu": 0.31, "data_wait": 0.02, "total_steps": lines * 2}))
      if step % 1000 == 999:
        batch.append(json.dumps({"step": step, "time": t0 + step, "eval_loss": 0.7, "eval_loss_t0.5": 0.6}))
      if len(batch) >= 100_000:
        f.write("\n".join(batch) + "\n")
        batch = []
    if batch:
      f.write("\n".join(batch) + "\n")
  return os.path.getsize(path)


def _timed_get(url: str) -> tuple[float, bytes]:
  start = time.perf_counter()
  with urllib.request.urlopen(url, timeout=120) as response:
    body = response.read()
  return time.perf_counter() - start, body


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lines", type=int, default=1_000_000)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as run_dir:
    metrics = os.path.join(run_dir, "metrics.jsonl")
    size = _write_metrics(metrics, args.lines)
    start, start_cpu = time.perf_counter(), time.process_time()
    server = dashboard.make_server([run_dir], port=0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    api = f"{base}/api/metrics?run=0&max_points={dashboard.MAX_POINTS}&keys={KEYS}"
    request_walls = []
    while True:
      wall, body = _timed_get(api)
      request_walls.append(wall)
      answer = json.loads(body)
      if not answer["loading"]:
        break
    first, first_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if answer["rows"] != args.lines + args.lines // 1000:
      raise RuntimeError(f"complete answer has {answer['rows']} rows, expected {args.lines + args.lines // 1000}")
    points = max(len(s["value"]) for s in answer["series"].values())
    cached = [_timed_get(api)[0] for _ in range(args.repeats)]
    appended = []
    for i in range(args.repeats):
      with open(metrics, "a") as f:
        f.write(json.dumps({"step": args.lines + i, "time": time.time(), "loss": 0.1}) + "\n")
      while json.loads(_timed_get(f"{base}/api/runs")[1])["runs"][0]["rows"] == answer["rows"] + i:
        time.sleep(0.02)
      appended.append(_timed_get(api)[0])
    status = [_timed_get(f"{base}/api/runs")[0] for _ in range(args.repeats)]
    server.shutdown()
    server.server_close()
  result = {
      "bench": "dashboard", "time": time.time(), "lines": args.lines, "file_mb": round(size / 2**20, 1),
      "keys": len(KEYS.split(",")), "max_points_per_series": points,
      "first_request_s": round(request_walls[0], 3), "slowest_request_until_complete_s": round(max(request_walls), 3),
      "requests_until_complete": len(request_walls),
      "start_to_complete_answer_s": round(first, 3), "start_to_complete_answer_cpu_s": round(first_cpu, 3),
      "cached_answer_ms": round(statistics.median(cached) * 1e3, 2),
      "answer_after_append_ms": round(statistics.median(appended) * 1e3, 2),
      "status_ms": round(statistics.median(status) * 1e3, 2),
      "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
      # Other jobs on the machine inflate wall times (not CPU times); the load average says how much.
      "load_average_1m": round(os.getloadavg()[0], 2),
  }
  rows = [("metrics.jsonl", f"{args.lines:,} lines, {result['file_mb']} MB"),
          ("series requested", f"{result['keys']} (<= {points} points each)"),
          ("first request (loading)", f"{request_walls[0]:.2f} s wall"),
          ("slowest request until complete", f"{max(request_walls):.2f} s wall ({len(request_walls)} requests)"),
          ("server start to complete answer", f"{first:.2f} s wall, {first_cpu:.2f} s CPU"),
          ("cached answer (median)", f"{result['cached_answer_ms']} ms"),
          ("answer after append (median)", f"{result['answer_after_append_ms']} ms"),
          ("/api/runs (median)", f"{result['status_ms']} ms"),
          ("max RSS", f"{result['max_rss_mb']} MB"),
          ("machine", f"{result['machine']}, load average {result['load_average_1m']}")]
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f"{name:<{width}}  {value}")
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, "a") as f:
    f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()
