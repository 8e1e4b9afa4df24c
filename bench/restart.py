"""Benchmark: time from launching `train_pretrain.py` to its first step, with a cold and a warm compilation cache.

Launches the real entry script twice on synthetic shards, each time into a fresh run directory, sharing one
persistent compilation cache directory that is empty before the first launch. Prints a table and appends a JSON
line to bench/results/restart.jsonl. Target: warm <= 20% of cold.

  .venv/bin/python bench/restart.py [--config demo] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402 - needs the repository root on the path first
from echo_jax.data.shards import Sample, write_shard  # noqa: E402


def write_shards(directory: str, latent_dim: int, frames: int) -> str:
  rng = np.random.default_rng(0)
  for shard in range(2):
    samples = [Sample(f"s{shard}_{i}", rng.standard_normal((frames // 2, latent_dim)).astype(np.float16),
                      rng.standard_normal((frames // 2, latent_dim)).astype(np.float16), {"text": f"sample {i}"})
               for i in range(16)]
    write_shard(os.path.join(directory, f"train-{shard}.tar"), samples)
  return os.path.join(directory, "train-*.tar")


def time_to_first_step(config_path: str, shards: str, workdir: str, cache_dir: str) -> float:
  """Seconds from launch until metrics.jsonl holds step 1 (the process is then stopped)."""
  command = [sys.executable, os.path.join(common.REPO, "train_pretrain.py"), f"--config={config_path}",
             f"--workdir={workdir}", f"--config.data.train_shards={shards}", "--config.data.eval_shards=",
             "--config.train.steps=1000", "--config.train.log_every=1", "--config.samples.every=0",
             f"--config.compile_cache_dir={cache_dir}"]
  start = time.perf_counter()
  process = subprocess.Popen(command, cwd=common.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  try:
    while True:
      if process.poll() is not None:
        raise RuntimeError(f"train_pretrain.py exited early:\n{process.stderr.read()[-3000:]}")
      if os.path.exists(metrics):
        with open(metrics, encoding="utf-8") as f:
          if any(json.loads(line).get("step") == 1 for line in f if line.strip()):
            return time.perf_counter() - start
      time.sleep(0.05)
  finally:
    process.kill()
    process.wait()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="demo", help="config name (configs/ or bench/configs/) or path")
  args = parser.parse_args()
  config_path = common.config_path(args.config)
  config = common.load_config(args.config)
  with tempfile.TemporaryDirectory() as root:
    shards = write_shards(root, config.model.latent_dim, config.data.max_frames)
    cache_dir = os.path.join(root, "xla_cache")
    cold = time_to_first_step(config_path, shards, os.path.join(root, "cold"), cache_dir)
    warm = time_to_first_step(config_path, shards, os.path.join(root, "warm"), cache_dir)
  record = {"config": args.config, "cold_s": round(cold, 2), "warm_s": round(warm, 2),
            "warm_over_cold": round(warm / cold, 3), "target": 0.2, "machine": common.machine()}
  print(common.format_table([{"cache": "cold", "seconds": cold}, {"cache": "warm", "seconds": warm}],
                            [("cache", "cache", "s"), ("seconds", "launch -> first step (s)", ".2f")]))
  print(f"warm / cold = {warm / cold:.1%} (target <= 20%)")
  common.append_result("restart", record)


if __name__ == "__main__":
  main()
