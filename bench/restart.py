"""Benchmark: time from launching `train_pretrain.py` to its first step, with a cold and a warm compilation cache.

Launches the real entry script three times on synthetic training and held-out shards, all sharing one persistent
compilation cache directory that is empty before the first launch: a new run (cold), a restart of that run after
SIGTERM (warm; it resumes the checkpoint the SIGTERM saved, as after a preemption), and a new run of the same config
into another directory (warm). Prints a table and appends a JSON line to bench/results/restart.jsonl.
Target: warm <= 20% of cold.

  .venv/bin/python bench/restart.py [--config demo]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402 - needs the repository root on the path first
from echo_jax.data.shards import Sample, write_shard  # noqa: E402


def write_shards(directory: str, latent_dim: int, frames: int, prefix: str) -> str:
  rng = np.random.default_rng(0 if prefix == "train" else 1)
  for shard in range(2):
    samples = [Sample(f"{prefix}{shard}_{i}", rng.standard_normal((frames // 2, latent_dim)).astype(np.float16),
                      rng.standard_normal((frames // 2, latent_dim)).astype(np.float16), {"text": f"sample {i}"})
               for i in range(16)]
    write_shard(os.path.join(directory, f"{prefix}-{shard}.tar"), samples)
  return os.path.join(directory, f"{prefix}-*.tar")


def trained_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [record["step"] for record in map(json.loads, filter(str.strip, f)) if "loss" in record]


def start_event_time(workdir: str, after: float) -> float:
  """Wall-clock time of the first `start` event logged after `after` (compiled, restored or initialised)."""
  with open(os.path.join(workdir, "events.jsonl"), encoding="utf-8") as f:
    return min(e["time"] for e in map(json.loads, filter(str.strip, f)) if e["event"] == "start" and e["time"] > after)


def launch(config_path: str, shards: tuple[str, str], workdir: str, cache_dir: str) -> dict[str, float]:
  """Launches train_pretrain.py and measures the seconds until its `start` event (state compiled and restored or
  initialised) and until it logged its first step; then SIGTERMs it (it saves a checkpoint, which the next launch
  into `workdir` resumes) and waits for it to exit."""
  command = [sys.executable, os.path.join(common.REPO, "train_pretrain.py"), f"--config={config_path}",
             f"--workdir={workdir}", f"--config.data.train_shards={shards[0]}",
             f"--config.data.eval_shards={shards[1]}", "--config.train.steps=1000", "--config.train.log_every=1",
             "--config.samples.every=0", f"--config.compile_cache_dir={cache_dir}"]
  done = set(trained_steps(workdir))
  wall_start, start = time.time(), time.perf_counter()
  process = subprocess.Popen(command, cwd=common.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    while not (new := [step for step in trained_steps(workdir) if step not in done]):
      if process.poll() is not None:
        raise RuntimeError(f"train_pretrain.py exited early:\n{process.stderr.read()[-3000:]}")
      time.sleep(0.02)
    seconds = time.perf_counter() - start
    process.send_signal(signal.SIGTERM)
    if process.wait(timeout=300) != 0:
      raise RuntimeError(f"train_pretrain.py did not stop cleanly:\n{process.stderr.read()[-3000:]}")
    return {"seconds": seconds, "first_step": min(new), "ready_s": start_event_time(workdir, wall_start) - wall_start}
  finally:
    if process.poll() is None:
      process.kill()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="demo", help="config name (configs/ or bench/configs/) or path")
  args = parser.parse_args()
  config_path = common.config_path(args.config)
  config = common.load_config(args.config)
  rows = []
  with tempfile.TemporaryDirectory() as root:
    shards = tuple(write_shards(root, config.model.latent_dim, config.data.max_frames, prefix)
                   for prefix in ("train", "eval"))
    cache_dir = os.path.join(root, "xla_cache")
    run = os.path.join(root, "run")
    for name, workdir in (("cold: first launch, empty cache", run),
                          ("warm: restart of that run (resumes its checkpoint)", run),
                          ("warm: a new run of the same config", os.path.join(root, "new"))):
      rows.append({"launch": name, **launch(config_path, shards, workdir, cache_dir)})
  cold, restart, new_run = (row["seconds"] for row in rows)
  record = {"config": args.config, "cold_s": round(cold, 2), "warm_restart_s": round(restart, 2),
            "warm_new_run_s": round(new_run, 2), "restart_over_cold": round(restart / cold, 3),
            "new_run_over_cold": round(new_run / cold, 3), "ready_s": [round(row["ready_s"], 2) for row in rows],
            "target": 0.2, "machine": common.machine()}
  print(common.format_table(rows, [("launch", "launch", "s"), ("ready_s", "launch -> start event (s)", ".2f"),
                                   ("first_step", "first step", "d"),
                                   ("seconds", "launch -> first step done (s)", ".2f")]))
  print(f"restart / cold = {restart / cold:.1%}, new run / cold = {new_run / cold:.1%} (target <= 20%)")
  common.append_result("restart", record)


if __name__ == "__main__":
  main()
