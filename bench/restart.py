"""Benchmark: time from launching `train_pretrain.py` to its first step, with a cold and a warm compilation cache.

Compares like with like: the same launch with an empty and with a warm persistent compilation cache. On synthetic
training and held-out shards it launches the real entry script as
  1. a new run, cache empty (cold), stopped by SIGTERM, which saves a checkpoint (as at a preemption);
  2. a restart of that run, resuming that checkpoint, with the cache the first launch filled (warm);
  3. a restart of a copy of that run, resuming the same checkpoint, with another cache, empty (cold);
  4. a new run of the same config into another directory, warm cache (skipped with --no_new_run);
  with --warm_repeats N, launch 2 N times (the same checkpoint: a warm restart is killed after its first step), and
  with --restore_after_compile_too, N more with train.restore_beside_compile=False (the restore waits for the load);
  5. with --profile, launch 2 again (same checkpoint, same cache) under bench/stack_sampler.py, and prints where its
     seconds went: each thread's timeline (imports, restore, the executable's load...). Not in the ratios.
A new run evaluates the held-out set before its first step and a restart does not, so a restart is compared only
with a restart and a new run only with a new run. Prints a table and appends a JSON line to
bench/results/restart.jsonl (its restart_warm_over_cold maps each warm restart's name to its ratios; lines before
commit fe13629 hold one pair). Target: a warm restart takes <= 20% of a cold one. Each launch is timed to its first
step's start (the training loop begins: compiled or loaded, state restored, data open) and to that step's end; the
first step's compute is the same work in every launch, so the second ratio is the higher one.

  .venv/bin/python bench/restart.py [--config demo] [--set train.batch_size=16 ...] [--no_new_run] [--profile]
      [--warm_repeats N] [--restore_after_compile_too]

On a GPU (the machine's JAX with CUDA), e.g.:
  python bench/restart.py --config echo_1p3b --set train.batch_size=16 --set data.streams=1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common, stack_sampler  # noqa: E402 - needs the repository root on the path first
from echo_jax.data.shards import Sample, write_shard  # noqa: E402


def write_shards(directory: str, latent_dim: int, frames: int, prefix: str) -> str:
  rng = np.random.default_rng(0 if prefix == "train" else 1)
  for shard in range(2):
    samples = [Sample(f"{prefix}{shard}_{i}", rng.standard_normal((frames // 2, latent_dim)).astype(np.float16),
                      rng.standard_normal((frames // 2, latent_dim)).astype(np.float16), {"text": f"sample {i}"})
               for i in range(16)]
    write_shard(os.path.join(directory, f"{prefix}-{shard}.tar"), samples)
  return os.path.join(directory, f"{prefix}-*.tar")


def metrics_lines(workdir: str) -> list[dict]:
  """The lines of the run's metrics.jsonl so far (a launch appends to those of the launches before it)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def first_events(workdir: str, after: float) -> dict[str, dict]:
  """name -> the first event of that name logged after the wall-clock time `after`."""
  first: dict[str, dict] = {}
  with open(os.path.join(workdir, "events.jsonl"), encoding="utf-8") as f:
    for event in sorted((e for e in map(json.loads, filter(str.strip, f)) if e["time"] > after),
                        key=lambda e: e["time"]):
      first.setdefault(event["event"], event)
  return first


def launch(config_path: str, shards: tuple[str, str], workdir: str, cache_dir: str, overrides: list[str], *,
           resumed_later: bool, profile: str | None = None) -> dict[str, Any]:
  """Launches train_pretrain.py and measures the seconds until its `start` event (state compiled and restored or
  initialised), until its first step starts (the training loop begins; after a new run's step-0 evaluation) and
  until that step is done (its metrics line, whose step time runs from the loop's start to the step's end); with
  the seconds of the train step's compile (or load) and of the restore beside it, and when they began (imports,
  device start and set-up before them), from its events. Then,
  if a later launch resumes this run, SIGTERMs it (it saves a checkpoint, which the next launch into `workdir`
  resumes) and waits for it to exit; else kills it (a large model's save would only add minutes to the benchmark).
  With `profile` (a path), it runs under bench/stack_sampler.py, whose samples are written there at the first step."""
  sampler = [stack_sampler.__file__, profile] if profile else []
  command = [sys.executable, *sampler, os.path.join(common.REPO, "train_pretrain.py"), f"--config={config_path}",
             f"--workdir={workdir}", f"--config.data.train_shards={shards[0]}",
             f"--config.data.eval_shards={shards[1]}", "--config.train.steps=1000", "--config.train.log_every=1",
             "--config.samples.every=0", f"--config.compile_cache_dir={cache_dir}",
             *(f"--config.{override}" for override in overrides)]
  done = len(metrics_lines(workdir))
  # The previous launch's save and the copy of its checkpoint leave gigabytes of dirty pages (15.6 GB each for
  # echo_1p3b): flushed here, so that no launch pays the write-back of the benchmark's own earlier work while it
  # reads the checkpoint. The files stay in the page cache, as after a restart on the same host.
  os.sync()
  # A file, not a pipe: nobody reads a pipe while the trainer runs, and a full one would block it.
  with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
    wall_start = time.time()
    process = subprocess.Popen(command, cwd=common.REPO, stdout=subprocess.DEVNULL, stderr=log, text=True)

    def log_tail() -> str:
      log.seek(0)
      return log.read()[-3000:]

    try:
      while not (new := [line for line in metrics_lines(workdir)[done:] if "loss" in line]):
        if process.poll() is not None:
          raise RuntimeError(f"train_pretrain.py exited early:\n{log_tail()}")
        time.sleep(0.02)
      first = new[0]
      if profile:
        stack_sampler.request_write(profile)
      if resumed_later:
        process.send_signal(signal.SIGTERM)
        if process.wait(timeout=300) != 0:
          raise RuntimeError(f"train_pretrain.py did not stop cleanly:\n{log_tail()}")
    finally:
      if process.poll() is None:
        process.kill()
        process.wait()
  logged = first_events(workdir, wall_start)
  start, restored = logged["start"], logged.get("checkpoint_restored")
  return {"start_event_s": round(start["time"] - wall_start, 2),
          "setup_s": round(restored["time"] - restored["seconds"] - wall_start, 2) if restored else None,
          "compile_s": start["compile_seconds"], "restore_s": restored["seconds"] if restored else None,
          "first_step": first["step"],
          "first_step_starts_s": round(first["time"] - first["step_time"] - wall_start, 2),
          "first_step_done_s": round(first["time"] - wall_start, 2)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="demo", help="config name (configs/ or bench/configs/) or path")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override passed to every launch, e.g. train.batch_size=16 (repeatable)")
  parser.add_argument("--no_new_run", action="store_true", help="skip the new run with the warm cache")
  parser.add_argument("--warm_repeats", type=int, default=1, help="warm restarts to time (each on the same checkpoint)")
  parser.add_argument("--restore_after_compile_too", action="store_true",
                      help="also time as many warm restarts whose restore waits for the load")
  parser.add_argument("--profile", action="store_true",
                      help="relaunch the warm restart under bench/stack_sampler.py and print where its seconds went")
  args = parser.parse_args()
  # A TERM (a time limit) unwinds like an error: the trainer it launched is killed and the temporary directory, with
  # its checkpoints, removed, instead of both outliving the benchmark.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  config_path = common.config_path(args.config)
  config = common.load_config(args.config)
  try:  # the shards are written for the overridden config too (latent_dim, max_frames)
    config.update_from_flattened_dict(common.parse_overrides(args.set))
  except (ValueError, KeyError) as error:
    parser.error(str(error))
  rows = []
  with tempfile.TemporaryDirectory() as root:
    shards = tuple(write_shards(root, config.model.latent_dim, config.data.max_frames, prefix)
                   for prefix in ("train", "eval"))

    def timed(name: str, workdir: str, cache: str, resumed_later: bool = False, profile: str | None = None,
              overrides: tuple[str, ...] = ()) -> dict[str, Any]:
      row = launch(config_path, shards, os.path.join(root, workdir), os.path.join(root, cache),
                   [*args.set, *overrides], resumed_later=resumed_later, profile=profile)
      rows.append({"launch": name, **row})
      print(f"{name}: {row['start_event_s']:.2f} s to the start event, {row['first_step_starts_s']:.2f} s to the "
            f"first step's start, {row['first_step_done_s']:.2f} s to its end", flush=True)
      return row

    cold_new = timed("new run, cold cache", "run", "cache", resumed_later=True)
    # The checkpoint the SIGTERM saved, for the cold restart: the warm restart below saves its own later ones.
    shutil.copytree(os.path.join(root, "run"), os.path.join(root, "run_copy"))
    warm_restarts = {}  # launch name -> its row

    def warm_restart(name: str, overrides: tuple[str, ...] = ()) -> None:
      for repeat in range(args.warm_repeats):
        full_name = f"{name} ({repeat + 1})" if repeat else name
        warm_restarts[full_name] = timed(full_name, "run", "cache", overrides=overrides)

    warm_restart("restart, warm cache")
    cold_restart = timed("restart, cold cache", "run_copy", "empty_cache")
    warm_new = None if args.no_new_run else timed("new run, warm cache", "new", "cache")
    if args.restore_after_compile_too:
      warm_restart("restart, warm cache, restore after the load", ("train.restore_beside_compile=False",))
    if args.profile:
      profile = os.path.join(root, "warm_restart.json.gz")
      timed("restart, warm cache, sampled", "run", "cache", profile=profile)
      where = stack_sampler.report(profile)

  def ratios(warm: dict[str, Any] | None, cold: dict[str, Any]) -> dict[str, float] | None:
    return None if warm is None else {
        name: round(warm[f"{name}_s"] / cold[f"{name}_s"], 3) for name in ("first_step_starts", "first_step_done")}

  restart = {name: ratios(row, cold_restart) for name, row in warm_restarts.items()}
  new_run = ratios(warm_new, cold_new)
  record = {"config": args.config, "overrides": args.set,
            "launches": {row["launch"]: {key: value for key, value in row.items() if key != "launch"} for row in rows},
            "restart_warm_over_cold": restart, "new_run_warm_over_cold": new_run, "target": 0.2,
            "machine": common.machine()}
  print(common.format_table(rows, [("launch", "launch", "s"), ("start_event_s", "launch -> start event (s)", ".2f"),
                                   ("setup_s", "launch -> restore and load begin (s)", ".2f"),
                                   ("compile_s", "compile or load (s)", ".2f"),
                                   ("restore_s", "restore, beside it (s)", ".2f"),
                                   ("first_step", "first step", "d"),
                                   ("first_step_starts_s", "launch -> first step starts (s)", ".2f"),
                                   ("first_step_done_s", "launch -> first step done (s)", ".2f")]))
  for name, rate in (*restart.items(), ("new run", new_run)):
    if rate is not None:
      print(f"{name}: warm / cold = {rate['first_step_starts']:.1%} to the first step's start, "
            f"{rate['first_step_done']:.1%} to its end (target <= 20%)")
  if args.profile:
    print("where the sampled warm restart's seconds went (seconds since its sampler started, just after the "
          f"interpreter):\n{where}")
  common.append_result("restart", record)


if __name__ == "__main__":
  main()
