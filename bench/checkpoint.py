"""Checkpoint save and restore of a full train state (params + AdamW moments), beside raw disk throughput.

    JAX_PLATFORMS=cpu python bench/checkpoint.py [--config bench_100m] [--repeats 3] [--dir DIR]

For each repeat, into a fresh directory: `Checkpointer.save` (the part that blocks the training loop), then
`wait()` (the whole save), then `restore` of the same step onto the same shardings. Beside it, in the same
directory, a file of the same size is written (write + fsync) and read back. Reads usually come from the page
cache for both, so the restore and the raw read are comparable to each other, not to the disk's cold read speed.
Prints a table (best of the repeats) and appends one JSON line to bench/results/checkpoint.jsonl.
Target: blocked < 10% of the whole save.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402 - needs the repository root on the path first
from echo_jax.checkpoint import Checkpointer  # noqa: E402
from echo_jax.config import model_config  # noqa: E402
from echo_jax.model import Echo  # noqa: E402
from echo_jax.train.state import count_params, create_train_state  # noqa: E402

TARGET_BLOCKED_FRACTION = 0.10
CHUNK = 16 << 20


def raw_write(path: str, size: int) -> float:
  """Seconds to write `size` bytes in 16 MiB pieces and fsync them."""
  buffer = np.random.default_rng(0).integers(0, 256, CHUNK, dtype=np.uint8).tobytes()
  start = time.perf_counter()
  with open(path, "wb", buffering=0) as stream:
    written = 0
    while written < size:
      written += stream.write(buffer[:min(CHUNK, size - written)])
    os.fsync(stream.fileno())
  return time.perf_counter() - start


def raw_read(path: str) -> float:
  """Seconds to read the whole file in 16 MiB pieces into one reused buffer."""
  buffer = bytearray(CHUNK)
  start = time.perf_counter()
  with open(path, "rb", buffering=0) as stream:
    while stream.readinto(buffer):
      pass
  return time.perf_counter() - start


def one_round(directory: str, state: Any, abstract_state: Any, nbytes: int, step: int) -> dict[str, float]:
  """Save, wait, restore, then raw write and read, all in `directory`; returns the seconds of each."""
  checkpointer = Checkpointer(os.path.join(directory, "checkpoints"), keep=2)
  start = time.perf_counter()
  checkpointer.save(step, state, [{"epoch": 0, "shard": 0, "sample": 0}], {"benchmark": "checkpoint"})
  blocked = time.perf_counter() - start
  checkpointer.wait()
  whole = time.perf_counter() - start
  start = time.perf_counter()
  restored, _, _ = checkpointer.restore(step, abstract_state)
  jax.block_until_ready(restored)
  restore = time.perf_counter() - start
  checkpointer.close()
  if int(restored.step) != int(state.step):
    raise RuntimeError(f"restored step {int(restored.step)} differs from the saved {int(state.step)}")
  del restored
  raw_path = os.path.join(directory, "raw.bin")
  write = raw_write(raw_path, nbytes)
  read = raw_read(raw_path)
  return {"blocked_s": blocked, "save_s": whole, "restore_s": restore, "raw_write_fsync_s": write,
          "raw_read_s": read}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="bench_100m", help="a name in configs/ or bench/configs/")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default=None, help="where to write (default: the system temporary directory)")
  parser.add_argument("--no_save", action="store_true", help="print only; do not append to bench/results/")
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error("--repeats must be at least 1")

  config = common.load_config(args.config)
  model = Echo(model_config(config))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = jax.jit(lambda key: create_train_state(model, key, config), out_shardings=device)(jax.random.key(0))
  state = jax.block_until_ready(state)
  abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))

  rounds = []
  for repeat in range(args.repeats):
    directory = tempfile.mkdtemp(prefix="echo_ckpt_bench_", dir=args.dir)
    try:
      rounds.append({**one_round(directory, state, abstract_state, nbytes, step=repeat + 1),
                     "load_average_1m": round(os.getloadavg()[0], 2)})
    finally:
      shutil.rmtree(directory, ignore_errors=True)

  best = {key: min(r[key] for r in rounds) for key in rounds[0] if key != "load_average_1m"}
  # The fraction is per round (blocked and whole of the same save), then the best round.
  blocked_fraction = min(r["blocked_s"] / r["save_s"] for r in rounds)
  gb = nbytes / 1e9
  machine = common.machine()
  rows = [
      {"what": "save: training loop blocked", "s": best["blocked_s"], "gb_s": gb / best["blocked_s"]},
      {"what": "save: whole (until wait())", "s": best["save_s"], "gb_s": gb / best["save_s"]},
      {"what": "restore", "s": best["restore_s"], "gb_s": gb / best["restore_s"]},
      {"what": "raw write + fsync", "s": best["raw_write_fsync_s"], "gb_s": gb / best["raw_write_fsync_s"]},
      {"what": "raw read", "s": best["raw_read_s"], "gb_s": gb / best["raw_read_s"]},
  ]
  print(f"{args.config}: {count_params(state.params) / 1e6:.1f}M parameters, train state {nbytes / 1e6:.0f} MB; "
        f"{machine['cpu_model']}, {machine['cores_usable']} cores, load average {machine['load_average_1m']}; "
        f"best of {args.repeats}")
  print(common.format_table(rows, [("what", "", ""), ("s", "seconds", ".3f"), ("gb_s", "GB/s", ".2f")]))
  print(f"blocked / whole save: {blocked_fraction:.1%} (target < {TARGET_BLOCKED_FRACTION:.0%}); "
        f"whole save / raw write+fsync: {best['save_s'] / best['raw_write_fsync_s']:.2f}x; "
        f"restore / raw read: {best['restore_s'] / best['raw_read_s']:.2f}x")
  if not args.no_save:
    path = common.append_result("checkpoint", {
        "config": args.config, "params_m": round(count_params(state.params) / 1e6, 2), "state_bytes": nbytes,
        "repeats": args.repeats, "best": best, "rounds": rounds, "blocked_fraction": blocked_fraction,
        "target_blocked_fraction": TARGET_BLOCKED_FRACTION, "machine": machine})
    print(f"appended to {path}")


if __name__ == "__main__":
  main()
