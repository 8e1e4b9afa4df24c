"""Benchmark: restoring a whole train state in a fresh process, under several bounds of `train.ckpt_restore_gb`.

    python bench/restore.py --config echo_1p3b --restore_gb 0,8,4,2 [--repeats 2]     # on a GPU
    JAX_PLATFORMS=cpu .venv/bin/python bench/restore.py --config demo

A child process saves a freshly initialised state of CONFIG (params + AdamW moments, uncompressed, as the trainer
saves by default) and the page cache's dirty pages are flushed (os.sync), so that no restore competes with the
write-back. Then, for each repeat and each bound, a fresh process restores it onto the first device with
`Checkpointer.restore` and the bound the trainer would use (`restore_budget_gb`: 0 = unbounded, else at least twice
the largest array). A restart's restore also pays the imports and the device's start (timed apart here) and runs
beside the train step's compile or load; this one runs alone. The files are read back raw (16 threads) too: reads
come from the page cache, so that is the floor of the reading part, not the disk's speed. Prints a table and
appends one JSON line to bench/results/restore.jsonl.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402 - the import time of a restore's process is part of what is measured
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402 - needs the repository root on the path first

STEP = 1
RESULT = "RESULT "


def child_save(config_name: str, directory: str) -> dict[str, Any]:
  import jax  # noqa: PLC0415 - only the children import JAX

  from echo_jax.checkpoint import Checkpointer  # noqa: PLC0415
  from echo_jax.config import model_config  # noqa: PLC0415
  from echo_jax.model import Echo  # noqa: PLC0415
  from echo_jax.train.state import create_train_state  # noqa: PLC0415

  config = common.load_config(config_name)
  model = Echo(model_config(config))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = jax.jit(lambda key: create_train_state(model, key, config), out_shardings=device)(jax.random.key(0))
  state = jax.block_until_ready(state)
  start = time.perf_counter()
  checkpointer = Checkpointer(directory, keep=1)
  checkpointer.save(STEP, state, [{"epoch": 0}], {"benchmark": "restore"})
  checkpointer.close()
  return {"save_s": time.perf_counter() - start, "state_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
          "arrays": len(jax.tree.leaves(state))}


def child_restore(config_name: str, directory: str, gb: float) -> dict[str, Any]:
  import jax  # noqa: PLC0415 - only the children import JAX

  from echo_jax.checkpoint import Checkpointer, restore_budget_gb  # noqa: PLC0415
  from echo_jax.config import model_config  # noqa: PLC0415
  from echo_jax.model import Echo  # noqa: PLC0415
  from echo_jax.train.state import abstract_train_state  # noqa: PLC0415

  start = time.perf_counter()
  imports = start - STARTED
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  device_start = time.perf_counter() - start
  config = common.load_config(config_name)
  abstract, _ = abstract_train_state(Echo(model_config(config)), config)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  bound = restore_budget_gb(abstract, gb)
  checkpointer = Checkpointer(directory, keep=1, restore_gb=bound)
  start = time.perf_counter()
  state, _, _ = checkpointer.restore(STEP, abstract)
  jax.block_until_ready(state)
  restore = time.perf_counter() - start
  checkpointer.close()
  return {"imports_s": imports, "device_start_s": device_start, "bound_gb": bound, "restore_s": restore}


def run_child(*args: str) -> dict[str, Any]:
  """Runs this script as a child with `args`; its result line, or an error carrying its output's tail."""
  process = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                           timeout=900, check=False)
  lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT)]
  if process.returncode != 0 or not lines:
    raise RuntimeError(f"{' '.join(args)} failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
  return json.loads(lines[-1][len(RESULT):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="demo", help="config name (configs/ or bench/configs/) or path")
  parser.add_argument("--restore_gb", default="0,8,4,2",
                      help="comma-separated bounds (train.ckpt_restore_gb; 0 = unbounded), each restored in turn")
  parser.add_argument("--repeats", type=int, default=1, help="rounds over all the bounds")
  parser.add_argument("--dir", default=None, help="where to save (default: the system temporary directory)")
  parser.add_argument("--no_save", action="store_true", help="print only; do not append to bench/results/")
  parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    what, directory, *gb = args.child
    result = child_save(args.config, directory) if what == "save" else child_restore(args.config, directory,
                                                                                     float(gb[0]))
    print(RESULT + json.dumps(result), flush=True)
    return
  try:
    bounds = [float(value) for value in args.restore_gb.split(",")]
  except ValueError:
    parser.error(f"--restore_gb takes numbers separated by commas, got {args.restore_gb!r}")
  if args.repeats < 1 or any(gb < 0 for gb in bounds):
    parser.error("--repeats must be at least 1 and every bound >= 0")

  with tempfile.TemporaryDirectory(prefix="echo_restore_bench_", dir=args.dir) as root:
    directory = os.path.join(root, "checkpoints")
    saved = run_child("--config", args.config, "--child", "save", directory)
    os.sync()
    raw = common.raw_read_seconds([os.path.join(top, name) for top, _, names in os.walk(directory) for name in names],
                                  workers=16)
    rounds = [{**run_child("--config", args.config, "--child", "restore", directory, str(gb)), "restore_gb": gb}
              for _ in range(args.repeats) for gb in bounds]
  gb_total = saved["state_bytes"] / 1e9
  rows = [{"what": "restore, " + (f"train.ckpt_restore_gb={r['restore_gb']:g} (bound {r['bound_gb']:.2f} GB)"
                                  if r["bound_gb"] else "unbounded (0)"),
           "s": r["restore_s"], "gb_s": gb_total / r["restore_s"], "imports_s": r["imports_s"],
           "device_s": r["device_start_s"]} for r in rounds]
  rows.append({"what": "raw read of the files, 16 threads", "s": raw, "gb_s": gb_total / raw})
  machine = common.machine()
  print(f"{args.config}: train state {gb_total:.2f} GB in {saved['arrays']} arrays, saved in {saved['save_s']:.1f} s; "
        f"{machine['cpu_model']}, {machine['cores_usable']} cores, load average {machine['load_average_1m']}")
  print(common.format_table(rows, [("what", "", ""), ("s", "seconds", ".2f"), ("gb_s", "GB/s", ".2f"),
                                   ("imports_s", "imports (s)", ".2f"), ("device_s", "device start (s)", ".2f")]))
  if not args.no_save:
    path = common.append_result("restore", {"config": args.config, **saved, "raw_read_s": raw, "rounds": rounds,
                                            "machine": machine})
    print(f"appended to {path}")


if __name__ == "__main__":
  main()
