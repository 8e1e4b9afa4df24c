"""Keeps every watched filesystem from filling up (DESIGN §10); run it on every host next to the trainer.

  python disk_watchdog.py --min-free-gb 20 --interval 60 --keep-checkpoints 2 runs/ ~/.cache/huggingface \
      ~/.cache/echo_jax data/
  python disk_watchdog.py --once --dry-run runs/     # show what would go, delete nothing

Deletes, in order and oldest first: stale partial downloads, consumed shards, stale shards of the trainer's shard
cache, saves abandoned for 6 hours, unused Hugging Face cache revisions, compilation-cache entries not used for a
week, checkpoints beyond the newest kept ones, and last among those the run's keep_period milestones. Never the
newest complete checkpoint, never a save in progress. Local filesystems only.
"""

from __future__ import annotations

import argparse
import logging
import math

from echo_jax import watchdog


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("paths", nargs="+", metavar="PATH", help="directories to watch and clean")
  parser.add_argument("--min-free-gb", type=float, default=20.0, help="free space to keep on each filesystem (GiB)")
  parser.add_argument("--interval", type=float, default=60.0, help="seconds between checks")
  parser.add_argument("--keep-checkpoints", type=int, default=2,
                      help="complete checkpoints to keep per checkpoints/ dir (the newest is always kept)")
  parser.add_argument("--dry-run", action="store_true", help="log what would be deleted, delete nothing")
  parser.add_argument("--once", action="store_true", help="check once and exit (exit code 1 if still short)")
  args = parser.parse_args()
  if not (0 <= args.min_free_gb < math.inf and 0 < args.interval < math.inf) or args.keep_checkpoints < 0:  # NaN too
    parser.error("--min-free-gb and --keep-checkpoints must be >= 0 and --interval > 0, all finite numbers")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s disk_watchdog %(levelname)s %(message)s")
  try:
    report = watchdog.watch(args.paths, int(args.min_free_gb * 2**30), args.interval, args.keep_checkpoints,
                            args.dry_run, args.once)
  except FileNotFoundError as error:
    parser.error(str(error))
  except KeyboardInterrupt:
    return
  if report.still_short:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
