"""Checkpoint save and restore of a full train state (params + AdamW moments), beside raw disk throughput.

    JAX_PLATFORMS=cpu python bench/checkpoint.py [--config bench_100m] [--repeats 3] [--dir DIR] [--sharded]

For each setting of zstd compression (`Checkpointer(compression=...)`, `train.ckpt_compression`), one Checkpointer
saves a step per repeat into one directory, as a run does: `Checkpointer.save` (the part that blocks the training
loop), then `wait()` (the whole save), then `restore` of that step onto the same shardings. The first save is shown
apart: a process's first save compiles what the later ones reuse (the checksum program, and with --sharded, the
state laid out as the trainer lays it out over every device, e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8,
any slicing programs of Orbax's for replicated arrays); the other rows are the best of the later saves. Beside
them, a file of the state's size is written (write + fsync) and read back. Reads usually come from the page cache
for both, so the restore and the raw read are comparable to each other, not to the disk's cold read speed. A restore
is bounded as the trainer's is (`train.ckpt_restore_gb`). Every float of the state gets random noise first: a fresh
state's AdamW moments are zeros, which compress to nothing, and a trained state's do not. Prints a table and appends
one JSON line to bench/results/checkpoint.jsonl.
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
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402 - needs the repository root on the path first
from echo_jax import sharding  # noqa: E402
from echo_jax.checkpoint import Checkpointer, restore_budget_gb  # noqa: E402
from echo_jax.config import model_config  # noqa: E402
from echo_jax.model import Echo  # noqa: E402
from echo_jax.train.state import count_params, create_train_state  # noqa: E402
from echo_jax.train.step import sharded_abstract_state  # noqa: E402

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


def directory_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


def checkpoint_round(checkpointer: Checkpointer, state: Any, abstract_state: Any, step: int) -> dict[str, float]:
  """Save, wait and restore `step` with `checkpointer`; returns the seconds of each and the step's bytes on disk."""
  start = time.perf_counter()
  checkpointer.save(step, state, [{"epoch": 0, "shard": 0, "sample": 0}], {"benchmark": "checkpoint"})
  blocked = time.perf_counter() - start
  checkpointer.wait()
  whole = time.perf_counter() - start
  start = time.perf_counter()
  restored, _, _ = checkpointer.restore(step, abstract_state)
  jax.block_until_ready(restored)
  restore = time.perf_counter() - start
  if int(restored.step) != int(state.step):
    raise RuntimeError(f"restored step {int(restored.step)} differs from the saved {int(state.step)}")
  return {"blocked_s": blocked, "save_s": whole, "restore_s": restore,
          "disk_bytes": directory_bytes(os.fspath(checkpointer.directory / str(step)))}


def raw_round(directory: str, nbytes: int) -> dict[str, float]:
  """Raw write + fsync and read back of `nbytes` in `directory`."""
  raw_path = os.path.join(directory, "raw.bin")
  try:
    return {"raw_write_fsync_s": raw_write(raw_path, nbytes),
            "raw_read_s": common.raw_read_seconds([raw_path], piece=CHUNK)}
  finally:
    os.remove(raw_path)


def with_noise(state: Any) -> Any:
  """Every float leaf plus N(0, 0.01²) noise: bytes that compress like a trained state's, not like zeros."""
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
  return jax.tree.map(lambda leaf: leaf + 0.01 * jax.random.normal(next(keys), leaf.shape, leaf.dtype)
                      if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, state)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="bench_100m", help="a name in configs/ or bench/configs/")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default=None, help="where to write (default: the system temporary directory)")
  parser.add_argument("--sharded", action="store_true",
                      help="lay the state out as the trainer does (FSDP over every device), not on one device")
  parser.add_argument("--no_save", action="store_true", help="print only; do not append to bench/results/")
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error("--repeats must be at least 1")

  config = common.load_config(args.config)
  model = Echo(model_config(config))
  layout = (sharding.shardings_of(sharded_abstract_state(model, config, sharding.make_mesh(config.mesh.to_dict())))
            if args.sharded else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  state = jax.jit(lambda key: with_noise(create_train_state(model, key, config)),
                  out_shardings=layout)(jax.random.key(0))
  state = jax.block_until_ready(state)
  abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  restore_gb = restore_budget_gb(abstract_state, config.train.ckpt_restore_gb)  # as the trainer restores

  directory = tempfile.mkdtemp(prefix="echo_ckpt_bench_", dir=args.dir)
  try:
    settings = {name: Checkpointer(os.path.join(directory, name, "checkpoints"), keep=2, compression=compression,
                                   restore_gb=restore_gb) for name, compression in (("plain", False), ("zstd", True))}
    # Each setting's first save, apart: it compiles what the later ones reuse.
    first = {name: checkpoint_round(checkpointer, state, abstract_state, step=1)
             for name, checkpointer in settings.items()}
    rounds = []
    for repeat in range(args.repeats):
      rounds.append({**{name: checkpoint_round(checkpointer, state, abstract_state, step=repeat + 2)
                        for name, checkpointer in settings.items()},
                     **raw_round(directory, nbytes), "load_average_1m": round(os.getloadavg()[0], 2)})
    for checkpointer in settings.values():
      checkpointer.close()
  finally:
    shutil.rmtree(directory, ignore_errors=True)

  best = {key: min(r[key] for r in rounds) for key in ("raw_write_fsync_s", "raw_read_s")}
  for name in ("plain", "zstd"):
    best[name] = {key: min(r[name][key] for r in rounds) for key in rounds[0][name]}
  # The fraction is per round (blocked and whole of the same save), then the best round; for the default setting.
  blocked_fraction = min(r["plain"]["blocked_s"] / r["plain"]["save_s"] for r in rounds)
  gb = nbytes / 1e9
  machine = common.machine()
  rows = []
  for name, label in (("plain", "no compression (default)"), ("zstd", "zstd (train.ckpt_compression)")):
    on_disk = best[name]["disk_bytes"] / 1e9
    rows += [
        {"what": f"{label}: training loop blocked", "s": best[name]["blocked_s"],
         "gb_s": gb / best[name]["blocked_s"], "disk_gb": on_disk},
        {"what": f"{label}: whole save (until wait())", "s": best[name]["save_s"], "gb_s": gb / best[name]["save_s"],
         "disk_gb": on_disk},
        {"what": f"{label}: restore", "s": best[name]["restore_s"], "gb_s": gb / best[name]["restore_s"],
         "disk_gb": on_disk},
    ]
  first_blocked = first["plain"]["blocked_s"]
  rows += [{"what": "default: first save of the process: training loop blocked", "s": first_blocked,
            "gb_s": gb / first_blocked},
           {"what": "raw write + fsync", "s": best["raw_write_fsync_s"], "gb_s": gb / best["raw_write_fsync_s"]},
           {"what": "raw read", "s": best["raw_read_s"], "gb_s": gb / best["raw_read_s"]}]
  print(f"{args.config}: {count_params(state.params) / 1e6:.1f}M parameters, train state {nbytes / 1e6:.0f} MB "
        f"{'sharded over' if args.sharded else 'on 1 of'} {jax.device_count()} devices; "
        f"{machine['cpu_model']}, {machine['cores_usable']} cores, load average {machine['load_average_1m']}; "
        f"best of {args.repeats} saves after the first")
  print(common.format_table(rows, [("what", "", ""), ("s", "seconds", ".3f"), ("gb_s", "GB/s", ".2f"),
                                   ("disk_gb", "GB on disk", ".3f")]))
  print(f"default setting: blocked / whole save: {blocked_fraction:.1%} (target < {TARGET_BLOCKED_FRACTION:.0%}); "
        f"whole save / raw write+fsync: {best['plain']['save_s'] / best['raw_write_fsync_s']:.2f}x; "
        f"restore / raw read: {best['plain']['restore_s'] / best['raw_read_s']:.2f}x")
  if not args.no_save:
    path = common.append_result("checkpoint", {
        "config": args.config, "params_m": round(count_params(state.params) / 1e6, 2), "state_bytes": nbytes,
        "sharded_over": jax.device_count() if args.sharded else 1, "first": first,
        "repeats": args.repeats, "best": best, "rounds": rounds, "blocked_fraction": blocked_fraction,
        "target_blocked_fraction": TARGET_BLOCKED_FRACTION, "machine": machine})
    print(f"appended to {path}")


if __name__ == "__main__":
  main()
