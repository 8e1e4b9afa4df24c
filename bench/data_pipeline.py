"""Benchmark: data Pipeline throughput on one CPU core, beside a raw sequential read of the same shard files.

Writes shards of 30-second samples (750 target frames and 250 reference frames of 128 float16 channels) to a
temporary directory, then measures, pinned to one core, (1) reading those files' bytes in 1 MiB pieces and (2) the
Pipeline producing batches. Prints a table and appends one JSON line to bench/results/data_pipeline.jsonl.
Targets: >= 1,000 samples/s per core and >= 30% of the raw read rate.

  .venv/bin/python bench/data_pipeline.py [--shards 4 --per_shard 128 --batch_size 32 --batches 48 --cpu 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402 - needs the repository root on the path first
from echo_jax.data.pipeline import Pipeline
from echo_jax.data.shards import Sample, write_shard  # noqa: E402

FRAMES, REF_FRAMES, DIM = 750, 250, 128
TEXT = "The quick brown fox jumps over the lazy dog while the band plays on in the square. " * 5


def _write_shards(directory: str, num_shards: int, per_shard: int) -> list[str]:
  rng = np.random.default_rng(0)
  paths = []
  for s in range(num_shards):
    samples = [
        Sample(
            key=f"s{s:04d}_{i:06d}",
            latent=rng.standard_normal((FRAMES, DIM), np.float32).astype(np.float16),
            ref=rng.standard_normal((REF_FRAMES, DIM), np.float32).astype(np.float16),
            meta={"text": TEXT},
        ) for i in range(per_shard)
    ]
    path = os.path.join(directory, f"shard-{s:04d}.tar")
    write_shard(path, samples)
    paths.append(path)
  return paths


def _pipeline_run(paths: list[str], batch_size: int, batches: int) -> tuple[float, float]:
  """(Wall, CPU) seconds for `batches` batches after two warm-up batches (thread start, first shard).

  CPU seconds of the whole process (both threads share the pinned core) give a per-core rate that holds even when
  other jobs share the core and stretch the wall time.
  """
  with Pipeline(
      shards=paths, batch_size=batch_size, latent_dim=DIM, max_text_len=768, max_frames=FRAMES,
      max_ref_frames=REF_FRAMES // 4 * 4, pad_latent=np.zeros(DIM, np.float32), seed=0, prefetch=2) as pipeline:
    for _ in range(2):
      next(pipeline)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(pipeline)
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--per_shard", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=48)
  parser.add_argument("--cpu", type=int, default=0, help="the one core to pin the benchmark (and its threads) to")
  args = parser.parse_args()
  # Threads inherit the creating thread's affinity, so the pipeline's reader thread shares this one core.
  os.sched_setaffinity(0, {args.cpu})

  with tempfile.TemporaryDirectory() as directory:
    paths = _write_shards(directory, args.shards, args.per_shard)
    total_bytes = sum(os.path.getsize(p) for p in paths)
    bytes_per_sample = total_bytes / (args.shards * args.per_shard)
    common.raw_read_seconds(paths, piece=1 << 20)  # Both measurements read from the page cache.
    raw_s = min(common.raw_read_seconds(paths, piece=1 << 20) for _ in range(3))
    pipe_s, pipe_cpu_s = _pipeline_run(paths, args.batch_size, args.batches)

  raw_mb_s = total_bytes / raw_s / 1e6
  pipe_samples_s = args.batch_size * args.batches / pipe_s
  pipe_mb_s = pipe_samples_s * bytes_per_sample / 1e6
  record = {
      "machine": {**common.machine(), "cores_used": 1},
      "sample": {
          "frames": FRAMES, "ref_frames": REF_FRAMES, "dim": DIM, "shard_bytes_per_sample": round(bytes_per_sample)},
      "shards": args.shards, "per_shard": args.per_shard, "batch_size": args.batch_size, "batches": args.batches,
      "raw_read_mb_s": round(raw_mb_s, 1),
      "raw_read_samples_s": round(raw_mb_s * 1e6 / bytes_per_sample, 1),
      "pipeline_samples_s": round(pipe_samples_s, 1),
      "pipeline_mb_s": round(pipe_mb_s, 1),
      "pipeline_samples_per_cpu_s": round(args.batch_size * args.batches / pipe_cpu_s, 1),
      "pipeline_fraction_of_raw": round(pipe_mb_s / raw_mb_s, 3),
      "targets": {"samples_s": 1000, "fraction_of_raw": 0.3},
  }
  print(f"machine: {record['machine']['cpu_model']}, {record['machine']['cores']} cores, pinned to core {args.cpu}")
  print(f"{'reader':<12}{'samples/s':>12}{'MB/s':>10}")
  print(f"{'raw read':<12}{record['raw_read_samples_s']:>12.0f}{raw_mb_s:>10.0f}")
  print(f"{'Pipeline':<12}{pipe_samples_s:>12.0f}{pipe_mb_s:>10.0f}")
  print(f"Pipeline / raw: {record['pipeline_fraction_of_raw']:.1%} (target 30%); "
        f"samples/s per core: {pipe_samples_s:.0f} wall, {record['pipeline_samples_per_cpu_s']:.0f} per CPU second "
        "(target 1000)")
  common.append_result("data_pipeline", record)


if __name__ == "__main__":
  main()
