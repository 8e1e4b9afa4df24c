"""Train-step speed and MFU on one device: the real compiled step (`StepFunctions.compile`) on random batches.

    JAX_PLATFORMS=cpu python bench/train_step.py [--configs tiny,demo,bench_100m] [--steps 5]
        [--batch_size 4] [--set model.remat=none --set data.max_frames=512 ...]

For each config: compile the train step on a 1-device mesh for the config's batch shapes, run warm-up steps, then
time `--steps` steps one by one (each waits for its result). MFU divides the model FLOPs of a step (analytic,
`echo_jax.metrics`) by the best step time and by the device's peak. On CPU that peak is the float32 matmul rate
measured in this same run (before and after the configs; the higher counts); on a shared machine other jobs stretch
the step and the short matmul unequally, so MFU(CPU s) repeats the ratio in process CPU seconds (step and matmul
alike), which they do not stretch. On a GPU or TPU the peak is the data sheet's dense bf16 rate
(`metrics.PEAK_FLOPS_PER_DEVICE`), and MFU(matmul) sets the step beside a bf16 matmul measured in the same run.
Prints a table; appends one JSON line per config to bench/results/train_step.jsonl.
CPU target: >= 40% MFU for bench_100m. On one H100, e.g.:

    python bench/train_step.py --configs echo_1p3b --batch_size 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402 - needs the repository root on the path first
from echo_jax import metrics, sharding  # noqa: E402
from echo_jax.config import model_config  # noqa: E402
from echo_jax.model import Echo, EchoConfig  # noqa: E402
from echo_jax.train.state import count_params, create_train_state, example_inputs  # noqa: E402
from echo_jax.train.step import StepFunctions  # noqa: E402

TARGET_MFU = 0.40


def adaln_flops_per_frame_overcount(cfg: EchoConfig, batch: int, frames: int) -> float:
  """Train FLOPs that `metrics.forward_flops` counts for the low-rank AdaLN on every frame.

  The AdaLN projections act on the per-sample condition [B, 3·dim], not on each frame, so they cost their
  FLOPs once per sample; the library formula multiplies them by the frame count. Subtracting this gives the
  model FLOPs the step really needs (`model_flops` in the JSON).
  """
  per_sample_layer = 2 * 3 * 2 * cfg.dim * cfg.adaln_rank * 2.0  # two AdaLNs × shift/scale/gate × down+up, FLOPs
  return 3.0 * batch * (frames - 1) * cfg.layers * per_sample_layer


def matmul_rate_per_cpu_second(size: int, repeats: int) -> float:
  """FLOPs per process-CPU-second of the same square float32 matmul as `metrics.measure_matmul_peak`.

  The library measures wall time only; on a shared machine other jobs stretch wall time but not this process's
  CPU time, so MFU in CPU seconds (step and peak alike) shows the efficiency the code would have on a quiet machine.
  """
  a = jax.device_put(jnp.ones((size, size), jnp.float32), jax.devices()[0])
  matmul = jax.jit(lambda x: x @ x)
  _, cpu_times = common.time_calls(lambda: matmul(a).block_until_ready(), repeats)
  return 2.0 * size**3 / min(cpu_times)


def random_batch(config: ml_collections.ConfigDict, batch_size: int, shardings: dict[str, Any]) -> dict[str, Any]:
  """A batch of the pipeline's shapes: unit-variance latents, random bytes, masks with some padding."""
  rng = np.random.default_rng(0)
  arrays = {}
  for name, shape in example_inputs(config, batch_size).items():
    if shape.dtype == jnp.bool_:
      length = shape.shape[1]
      valid = rng.integers(length // 2, length + 1, size=shape.shape[0])
      value = np.arange(length)[None] < valid[:, None]
    elif shape.dtype == jnp.int32:
      value = rng.integers(1, 256, size=shape.shape, dtype=np.int32)
    else:
      value = rng.standard_normal(shape.shape, dtype=np.float32)
    arrays[name] = jax.device_put(value, shardings[name])
  return arrays


def bench_config(name: str, config: ml_collections.ConfigDict, steps: int, warmup: int) -> dict[str, Any]:
  """Compiles and times the train step of one config; returns its record (without MFU, which needs the peak)."""
  cfg = model_config(config)
  model = Echo(cfg)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  batch_size = config.train.batch_size
  shapes = example_inputs(config, batch_size)
  start = time.perf_counter()
  steps_fn = StepFunctions.compile(model, config, mesh, shapes, evaluate=False)
  compile_s = time.perf_counter() - start
  state = jax.jit(lambda key: create_train_state(model, key, config),
                  out_shardings=steps_fn.state_shardings)(jax.random.key(0))
  batch = random_batch(config, batch_size, {k: sharding.batch_sharding(mesh, len(s.shape)) for k, s in shapes.items()})

  holder = {"state": state}

  def one_step() -> None:
    holder["state"], step_metrics = steps_fn.train(holder["state"], batch)
    jax.block_until_ready((holder["state"], step_metrics))

  times, cpu_times = common.time_calls(one_step, steps, warmup=warmup)
  loss = float(jax.device_get(steps_fn.train(holder["state"], batch)[1]["loss"]))
  data = config.data
  analytic = metrics.train_flops_per_step(cfg, batch_size, data.max_frames, data.max_text_len, data.max_ref_frames)
  model_flops = analytic - adaln_flops_per_frame_overcount(cfg, batch_size, data.max_frames)
  best = min(times)
  return {
      "config": name, "params_m": round(count_params(steps_fn.abstract_state.params) / 1e6, 2),
      "batch_size": batch_size, "frames": data.max_frames, "text_len": data.max_text_len,
      "ref_frames": data.max_ref_frames, "dtype": cfg.dtype, "remat": cfg.remat, "compile_s": round(compile_s, 2),
      "steps_timed": steps, "step_s_best": best, "step_s_median": statistics.median(times),
      "step_spread": round(common.spread(times), 3), "step_s_all": times,
      "step_cpu_s_all": cpu_times,
      "step_cpu_s_best": min(cpu_times), "cpu_busy": sum(cpu_times) / sum(times), "samples_per_s": batch_size / best,
      "analytic_flops": analytic, "model_flops": model_flops, "xla_flops_scan_bodies_once": steps_fn.train_flops,
      "loss_finite": bool(np.isfinite(loss)), "load_average_1m": round(os.getloadavg()[0], 2),
      "device_kind": jax.devices()[0].device_kind, "peak_memory_gib": common.peak_memory_gib(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="tiny,demo,bench_100m",
                      help="comma-separated names in configs/ or bench/configs/")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per config (the best one is reported)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=0, help="overrides every config's batch size (0 = keep)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for every config, e.g. model.remat=none (repeatable)")
  parser.add_argument("--peak_size", type=int, default=0,
                      help="side of the square matmul for the measured peak (0: 2048 on CPU, 8192 elsewhere)")
  parser.add_argument("--peak_repeats", type=int, default=5)
  parser.add_argument("--no_save", action="store_true", help="print only; do not append to bench/results/")
  args = parser.parse_args()
  if args.steps < 1:
    parser.error("--steps must be at least 1")
  overrides = common.parse_overrides(args.set)
  if args.batch_size:
    overrides["train.batch_size"] = args.batch_size

  configs = {}
  for name in args.configs.split(","):  # all loaded first, so a bad name or override fails before any timing
    configs[name.strip()] = common.load_config(name.strip())
    configs[name.strip()].update_from_flattened_dict(overrides)

  on_cpu = jax.devices()[0].platform == "cpu"
  table_peak = None if on_cpu else metrics.peak_flops_per_device()  # an unknown device fails here, before any timing
  peak_size = args.peak_size or (2048 if on_cpu else 8192)
  peak_dtype = jnp.float32 if on_cpu else jnp.bfloat16
  peaks, cpu_peaks = [], []

  def measure_peaks() -> None:
    peaks.append(metrics.measure_matmul_peak(peak_size, args.peak_repeats, peak_dtype))
    if on_cpu:
      cpu_peaks.append(matmul_rate_per_cpu_second(peak_size, args.peak_repeats))

  measure_peaks()
  rows = [bench_config(name, config, args.steps, args.warmup) for name, config in configs.items()]
  measure_peaks()
  matmul_peak = max(peaks)
  peak = matmul_peak if on_cpu else table_peak
  cpu_peak = max(cpu_peaks) if on_cpu else None

  machine = common.machine()
  for row in rows:
    row["achieved_flops_s"] = row["model_flops"] / row["step_s_best"]
    row["mfu"] = row["achieved_flops_s"] / peak
    row["mfu_analytic"] = row["analytic_flops"] / row["step_s_best"] / peak
    row["mfu_matmul"] = row["achieved_flops_s"] / matmul_peak
    row["mfu_cpu_seconds"] = row["model_flops"] / row["step_cpu_s_best"] / cpu_peak if on_cpu else None

  print(f"{machine['cpu_model']}, {machine['cores_usable']} cores, {jax.devices()[0].device_kind}, "
        f"jax {machine['jax']}, XLA_FLAGS={machine['xla_flags']!r}, load average {machine['load_average_1m']}")
  unit, scale = ("GFLOP/s", 1e9) if on_cpu else ("TFLOP/s", 1e12)
  print(f"{jnp.dtype(peak_dtype).name} matmul: {matmul_peak / scale:.1f} {unit} ({peak_size}x{peak_size} @ "
        f"{peak_size}x{peak_size}, best of {args.peak_repeats}; before/after: "
        f"{', '.join(f'{p / scale:.1f}' for p in peaks)}); peak for MFU: {peak / scale:.1f} {unit} "
        f"({'that matmul' if on_cpu else 'data sheet, dense bf16'})")
  table = [{**row, "step_ms": row["step_s_best"] * 1e3, "median_ms": row["step_s_median"] * 1e3,
            "gflop": row["model_flops"] / 1e9, "gflop_s": row["achieved_flops_s"] / 1e9,
            "mfu_pct": row["mfu"] * 100, "mfu_analytic_pct": row["mfu_analytic"] * 100,
            "mfu_matmul_pct": row["mfu_matmul"] * 100,
            "mfu_cpu_pct": None if row["mfu_cpu_seconds"] is None else row["mfu_cpu_seconds"] * 100} for row in rows]
  print(common.format_table(table, [
      ("config", "config", ""), ("params_m", "params M", ".1f"), ("batch_size", "B", "d"), ("frames", "T", "d"),
      ("remat", "remat", ""), ("dtype", "dtype", ""), ("compile_s", "compile s", ".1f"),
      ("step_ms", "best ms", ".1f"), ("median_ms", "median ms", ".1f"), ("samples_per_s", "samples/s", ".2f"),
      ("gflop", "GFLOP/step", ".1f"), ("gflop_s", "GFLOP/s", ".1f"), ("mfu_pct", "MFU %", ".1f"),
      ("mfu_analytic_pct", "MFU(lib) %", ".1f"), ("mfu_matmul_pct", "MFU(matmul) %", ".1f"),
      ("mfu_cpu_pct", "MFU(CPU s) %", ".1f"), ("peak_memory_gib", "peak GiB", ".2f"),
      ("cpu_busy", "CPU busy", ".2f")]))
  cpu_seconds = (f"; MFU(CPU s) model FLOPs per CPU second of the best step over the matmul's FLOPs per CPU second "
                 f"({cpu_peak / 1e9:.1f} G)" if on_cpu else "")
  print(f"MFU uses model FLOPs (metrics.train_flops_per_step less its per-frame AdaLN count); MFU(lib) the library "
        f"formula as is; MFU(matmul) against the matmul measured here{cpu_seconds}. CPU busy: process CPU seconds "
        f"per wall second over the timed steps. Peak GiB: the device's most memory so far in this process (it "
        f"includes earlier configs of the same run). Target: {TARGET_MFU:.0%} for bench_100m on CPU.")
  if not args.no_save:
    for row in rows:
      path = common.append_result("train_step", {
          **row, "overrides": overrides, "peak_flops_s": peak, "matmul_peak_flops_s": matmul_peak,
          "matmul_peak_runs_flops_s": peaks, "matmul_peak_shape": [peak_size, peak_size],
          "matmul_peak_dtype": jnp.dtype(peak_dtype).name,
          "matmul_flops_per_cpu_s": cpu_peak, "matmul_flops_per_cpu_s_runs": cpu_peaks,
          "target_mfu": TARGET_MFU, "machine": machine})
    print(f"appended {len(rows)} records to {path}")


if __name__ == "__main__":
  main()
