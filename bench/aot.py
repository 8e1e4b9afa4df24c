"""Per-chip HBM, compile time and FLOPs of the pod configs on a TPU v4-64, compiled ahead of time on this machine.

    JAX_PLATFORMS=cpu python bench/aot.py [--configs echo_1p3b,echo_840m] [--remat dots_no_batch,full]
        [--find_max_batch] [--max_batch 512]

Runs `python -m echo_jax.aot` once per (config, remat) in a fresh process (each compile is independent and the
TPU compiler's memory is returned at exit), appending one JSON line each to bench/results/aot.jsonl. Targets:
echo_1p3b at global batch 256 under 50% of HBM per chip; each compile under 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results", "aot.jsonl")
TARGET_FRACTION = 0.5
TARGET_COMPILE_SECONDS = 120.0


def run(config: str, remat: str, args: argparse.Namespace) -> dict:
  """One `echo_jax.aot` run; returns its JSON record with the benchmark's fields added."""
  out = os.path.join(REPO, "bench", "results", f".aot_{config}_{remat}.jsonl")
  if os.path.exists(out):
    os.remove(out)
  command = [sys.executable, "-m", "echo_jax.aot", f"--config={REPO}/configs/{config}.py",
             f"--topology={args.topology}", f"--batch_size={args.batch_size}", f"--config.model.remat={remat}",
             f"--json_out={out}", f"--max_batch={args.max_batch}"]
  if args.find_max_batch:
    command.append("--find_max_batch")
  subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  with open(out, encoding="utf-8") as f:
    record = json.loads(f.readline())
  os.remove(out)
  record.update(benchmark="aot", config=config, remat=remat,
                machine={"platform": "cpu", "cores": os.cpu_count(), "python": platform.python_version(),
                         "load_average_1m": os.getloadavg()[0]})
  return record


def summary(record: dict) -> str:
  best = record.get("best", record) if "max_batch" in record else record
  if "max_batch" in record:
    compile_s = sum(r["compile_seconds"] for r in record["tried"])
    return (f"{record['config']:>10} remat={record['remat']:<13} max batch {record['max_batch']:>5} "
            f"(tried {[r['batch_size'] for r in record['tried']]}, {compile_s:.0f} s of compiles)")
  if not best["fits_compiler"]:
    return (f"{record['config']:>10} remat={record['remat']:<13} batch {best['batch_size']:>4}: DOES NOT FIT "
            f"({best['error']}); compile {best['compile_seconds']:.0f} s")
  meets = best["hbm_fraction"] < TARGET_FRACTION and best["compile_seconds"] < TARGET_COMPILE_SECONDS
  return (f"{record['config']:>10} remat={record['remat']:<13} batch {best['batch_size']:>4}: "
          f"{best['total_bytes'] / 2**30:6.2f} GiB/chip = {best['hbm_fraction']:6.1%} of HBM; compile "
          f"{best['compile_seconds']:5.0f} s; FLOPs/step XLA {best['xla_flops']:.3e}, analytic "
          f"{best['analytic_flops']:.3e}; {best['step_seconds_at_mfu'] * 1e3:.0f} ms at {best['mfu']:.0%} MFU"
          f"{'' if meets else '  (misses a target)'}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="echo_1p3b,echo_840m")
  parser.add_argument("--remat", default="dots_no_batch,full")
  parser.add_argument("--topology", default="v4-64")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--find_max_batch", action="store_true")
  parser.add_argument("--max_batch", type=int, default=4096)
  args = parser.parse_args()
  for config in args.configs.split(","):
    for remat in args.remat.split(","):
      record = run(config, remat, args)
      with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
      print(summary(record), flush=True)


if __name__ == "__main__":
  main()
