"""Shared pieces of the benchmarks in bench/: machine description, config loading, best-of timing, the JSONL
results file and the printed table (DESIGN §11: each benchmark prints a table and appends JSON to bench/results/).

Nothing here imports JAX, so a benchmark that does not use it (bench/data_pipeline.py) can use this module too.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
CONFIG_DIRS = (os.path.join(REPO, "configs"), os.path.join(BENCH_DIR, "configs"))


def cpu_model() -> str:
  """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as stream:
      for line in stream:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def machine() -> dict[str, Any]:
  """What a figure depends on besides the code: CPU, cores this process may use, load, library versions, XLA flags.

  The 1-minute load average is taken at call time; on a shared machine it says how much other jobs competed.
  """
  return {
      "cpu_model": cpu_model(),
      "cores": os.cpu_count(),
      "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      "python": platform.python_version(),
      "jax": _version("jax"),
      "jaxlib": _version("jaxlib"),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average_1m": round(os.getloadavg()[0], 2),
  }


def config_path(name: str) -> str:
  """The file of config NAME from configs/ or bench/configs/ (in that order), or NAME itself if it is a .py path."""
  candidates = [name] if name.endswith(".py") else [os.path.join(d, f"{name}.py") for d in CONFIG_DIRS]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise ValueError(f"no config {name!r}: looked for {', '.join(candidates)}")


def load_config(name: str) -> Any:
  """`get_config()` of config NAME (see `config_path`)."""
  from echo_jax.config import load_config_file  # noqa: PLC0415 — this module stays importable without JAX

  return load_config_file(config_path(name))


def peak_memory_gib() -> float | None:
  """The most memory the first JAX device has held so far (GiB), where its runtime reports it (GPU, TPU; not CPU)."""
  import jax  # noqa: PLC0415 — this module stays importable without JAX

  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
  """['model.remat=none'] -> {'model.remat': 'none'}; values are Python literals where they parse as one."""
  import ast  # noqa: PLC0415 — only the benchmarks that take overrides need it

  overrides = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key:
      raise ValueError(f"--set takes KEY=VALUE (e.g. model.remat=none), got {pair!r}")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return overrides


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[list[float], list[float]]:
  """(wall seconds, process CPU seconds) of each of `repeats` calls of `fn` after `warmup` untimed ones.

  `fn` must wait for its own result (e.g. `jax.block_until_ready`). On a shared machine report the minimum wall
  time (the run least disturbed by other jobs); CPU seconds are what other jobs do not stretch.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be at least 1, got {repeats}")
  for _ in range(warmup):
    fn()
  walls, cpus = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - start)
    cpus.append(time.process_time() - start_cpu)
  return walls, cpus


def spread(times: Sequence[float]) -> float:
  """(max − min) / min of repeated timings: how noisy the measurement was."""
  best = min(times)
  return (max(times) - best) / best if best > 0 else math.inf


def raw_read_seconds(paths: Sequence[str], *, workers: int = 1, piece: int = 16 << 20) -> float:
  """Seconds to read every byte of `paths`, `piece` bytes at a time into a buffer reused per file, with `workers`
  threads: the speed of the storage (usually the page cache) that a benchmark's own reads are compared with."""
  def read(path: str) -> None:
    buffer = bytearray(piece)
    with open(path, "rb", buffering=0) as stream:
      while stream.readinto(buffer):
        pass

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(read, paths))
  return time.perf_counter() - start


def append_result(name: str, record: dict[str, Any]) -> str:
  """Appends `record` (with a timestamp) as one line to bench/results/NAME.jsonl; returns the file's path."""
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"{name}.jsonl")
  line = json.dumps({"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record})
  with open(path, "a", encoding="utf-8") as stream:
    stream.write(line + "\n")
  return path


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
  """A text table, text columns left-aligned and numbers right-aligned.

  `columns` are (key, header, format spec such as '.2f' or ''); a missing or None value prints as '-'.
  """
  cells = [[header for _, header, _ in columns]]
  for row in rows:
    cells.append(["-" if row.get(key) is None else format(row[key], spec) for key, _, spec in columns])
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  # Text columns read better left-aligned, numbers right-aligned.
  left = [bool(rows) and isinstance(rows[0].get(key), str) for key, _, _ in columns]
  return "\n".join("  ".join(cell.ljust(width) if is_left else cell.rjust(width)
                             for cell, width, is_left in zip(line, widths, left, strict=True)) for line in cells)
