"""Disk watchdog (DESIGN §10): keeps free space on each watched filesystem above a threshold.

Local filesystems only: a gs:// path is not a directory to `check_paths`, and a bucket has no free space to run out of.

When space is short it deletes, class by class in this order and oldest first within a class, until enough is free:

1. stale partial downloads: `*.partial`, `*.part`, `*.incomplete` files untouched for `PARTIAL_MAX_AGE_S`;
2. consumed shards: `*.tar` files with a sibling marker `<name>.tar.consumed` (or `<stem>.consumed`);
3. stale shards: `*.tar` files in a stream directory of the trainer's shard cache (`<role>-<run>[-process_I]/stream_G`)
   untouched for `STALE_SHARD_AGE_S`: fetched ahead by a launch that was killed and never relaunched (a relaunch
   deletes them itself); a live stream reads what it fetches within minutes;
4. abandoned saves: Orbax's temporary save directories (`<step>.orbax-checkpoint-tmp...`) with nothing in them
   written for `ABANDONED_SAVE_AGE_S`: left by a launch killed mid-save (often by the full disk this watchdog guards
   against), which Orbax deletes only when the run is relaunched;
5. unused Hugging Face cache revisions: every revision of a cached repo but its newest;
6. compilation-cache entries not used for `COMPILE_CACHE_UNUSED_S` (a week): JAX's persistent compilation cache
   (`<key>-cache`, with its `<key>-atime` when JAX's own eviction is on) and echo_jax's compiled steps
   (`echo_executables/<key>.executable` with its `.inputs`), each entry's files together. Neither cache evicts by
   itself (JAX's `jax_compilation_cache_max_size` is unlimited by default) and every code or config change adds
   entries. "Used" is the latest access or modification time of the entry's files. echo_jax's executable cache sets
   an entry's modification time whenever a launch loads it; a hit in JAX's cache only reads its files (JAX rewrites
   `<key>-atime` only when its eviction is on), and Linux updates a file's access time on a read at most once a day
   under the default `relatime` mount option and never under `noatime`, where such an entry counts as used when
   written (the train step, the costly one, is in echo_jax's cache once a launch compiled it);
7. old checkpoints: Orbax step directories under any `checkpoints/` beyond the newest `keep_checkpoints` complete
   ones, oldest first;
8. among those, last, the `keep_period` milestones (steps that are a multiple of the run's `train.keep_period`,
   read from the `config.json` beside `checkpoints/`): the run keeps them on purpose, beyond the newest ones.

Checkpoint rules follow orbax-checkpoint 0.12.8: a save in progress lives in `<step>.orbax-checkpoint-tmp...` until
it is renamed, and a finished step directory holds `commit_success.txt` (written on every filesystem; on gs:// it
is the only completion mark). A step directory without it, or a temporary one, is never counted as complete; the
first is a save in progress and never deleted, and so is the second until it is abandoned (class 4). The newest
complete checkpoint is never deleted, whatever `keep_checkpoints`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence

import huggingface_hub

logger = logging.getLogger(__name__)

PARTIAL_SUFFIXES = (".partial", ".part", ".incomplete")
PARTIAL_MAX_AGE_S = 600.0
CONSUMED_SUFFIX = ".consumed"
ORBAX_TMP_MARKER = ".orbax-checkpoint-tmp"
ORBAX_COMMIT_FILE = "commit_success.txt"
CHECKPOINTS_DIR = "checkpoints"
_HF_REPO_DIR = re.compile(r"^(models|datasets|spaces)--")
STALE_SHARD_AGE_S = 24 * 3600.0
# A stream directory of echo_jax's shard cache (echo_jax.train.loop.Trainer._pipeline names them).
_SHARD_CACHE_STREAM = re.compile(r"(^|/)(train|eval)-[0-9a-f]{12}(-process_\d+)?/stream_\d+$")
# Orbax fails an async save whose background part (the writes, the hosts' barriers, the commit) runs past 20 minutes
# (AsyncOptions.timeout_secs, which echo_jax leaves at its default), and a save writes its files throughout: a
# temporary save directory with nothing written for hours is no save in progress but one whose launch died.
ABANDONED_SAVE_AGE_S = 6 * 3600.0
# A week: every launch of a run reads its steps' entries, so one that no launch read for a week is most likely of code
# or a config no longer run; access times have a day's resolution (relatime), far below it.
COMPILE_CACHE_UNUSED_S = 7 * 24 * 3600.0
# A file of JAX's persistent compilation cache (jax 0.10.2's LRUCache: `<module>-<sha256>-cache`, `...-atime`).
_JAX_CACHE_FILE = re.compile(r"^(?P<key>.+-[0-9a-f]{64})-(cache|atime)$")
# A file of echo_jax.executable_cache (its SUBDIRECTORY; named here so the watchdog need not import JAX): an
# executable, its inputs, or either one being written.
EXECUTABLES_DIR = "echo_executables"
_EXECUTABLE_FILE = re.compile(r"^(?P<key>[0-9a-f]{64})\.(executable|inputs)(\.tmp-[0-9a-f]{32})?$")
RUN_CONFIG = "config.json"
CLASS_ORDER = ("partial_download", "consumed_shard", "stale_shard", "abandoned_save", "hf_revision", "compile_cache",
               "checkpoint", "milestone_checkpoint")

FreeBytes = Callable[[str], int]


def disk_free_bytes(path: str) -> int:
  """Bytes available on the filesystem holding `path`."""
  return shutil.disk_usage(path).free


@dataclasses.dataclass
class Candidate:
  """Something the watchdog may delete."""

  kind: str  # one of CLASS_ORDER
  path: str
  size: int  # bytes it frees (an estimate for HF revisions, whose blobs may be shared)
  # Smaller is older: mtime, the newest write for abandoned saves, the last use for compilation-cache entries, or the
  # step for checkpoints.
  age_key: float
  delete: Callable[[], None]


@dataclasses.dataclass
class Deletion:
  kind: str
  path: str
  size: int
  dry_run: bool


@dataclasses.dataclass
class Report:
  """What one pass deleted (or would have, in a dry run) and which filesystems are still short of space."""

  deletions: list[Deletion] = dataclasses.field(default_factory=list)
  still_short: list[str] = dataclasses.field(default_factory=list)


def format_bytes(size: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(size) < 1024 or unit == "TB":
      return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
    size /= 1024
  raise AssertionError("unreachable")


def _tree_size(path: str) -> int:
  if not os.path.isdir(path) or os.path.islink(path):
    return os.lstat(path).st_size
  total = 0
  for dirpath, _, filenames in os.walk(path):
    for filename in filenames:
      with contextlib.suppress(FileNotFoundError):
        total += os.lstat(os.path.join(dirpath, filename)).st_size
  return total


def _remove(path: str) -> None:
  # Already gone is fine (the trainer's own cleanup may race with ours): the space is free either way.
  with contextlib.suppress(FileNotFoundError):
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.unlink(path)


def _is_temporary_save(name: str) -> bool:
  return ORBAX_TMP_MARKER in name


def _is_hf_cache(path: str, names: Sequence[str]) -> bool:
  return any(_HF_REPO_DIR.match(n) and os.path.isdir(os.path.join(path, n)) for n in names)


def _walk(root: str) -> Iterator[tuple[str, list[str], list[str], list[str]]]:
  """os.walk without following symlinks and without entering Orbax's temporary save directories, which it yields
  apart, as a fourth item: their files are a save's, in progress or abandoned, and go only with the whole directory."""
  for dirpath, dirnames, filenames in os.walk(root):
    saves = [d for d in dirnames if _is_temporary_save(d)]
    dirnames[:] = [d for d in dirnames if not _is_temporary_save(d)]
    yield dirpath, dirnames, filenames, saves


# The kinds of file deletable only once untouched this long.
_UNTOUCHED_FOR_S = {"partial_download": PARTIAL_MAX_AGE_S, "stale_shard": STALE_SHARD_AGE_S}


class _TouchedSinceListed(Exception):
  """A file found untouched for long was touched before its deletion: in use again (a shard a relaunch adopted)."""


def _modified(stat: os.stat_result) -> float:
  return stat.st_mtime


def _accessed_or_modified(stat: os.stat_result) -> float:
  return max(stat.st_atime, stat.st_mtime)


def _last_used(paths: Sequence[str], when: Callable[[os.stat_result], float] = _accessed_or_modified) -> float | None:
  """The latest time `when` gives of the files `paths` that exist (None when none does)."""
  times = []
  for path in paths:
    with contextlib.suppress(FileNotFoundError):
      times.append(when(os.lstat(path)))
  return max(times, default=None)


def _last_modified(paths: Sequence[str]) -> float | None:
  return _last_used(paths, _modified)


def _remove_unless_used(paths: Sequence[str], within: float,
                        last_used: Callable[[Sequence[str]], float | None] = _last_used) -> None:
  """Deletes the files `paths` (of one candidate) unless `last_used(paths)` is within the last `within` seconds (then
  raises _TouchedSinceListed): in use again since it was listed (a shard a relaunch adopted, a compilation-cache entry
  a launch loaded, a temporary save directory a relaunch writes again)."""
  last = last_used(paths)
  if last is not None and time.time() - last <= within:
    raise _TouchedSinceListed(paths[0])
  for path in paths:
    _remove(path)


def _newest_write(directories: Sequence[str]) -> float | None:
  """The latest modification time of `directories` and of everything in them (None when they are gone)."""
  times = []
  for directory in directories:
    for dirpath, dirnames, filenames in os.walk(directory):
      last = _last_modified([dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames])
      if last is not None:
        times.append(last)
  return max(times, default=None)


def _abandoned_save_candidates(directory: str, saves: Sequence[str], now: float) -> list[Candidate]:
  """The temporary save directories `saves` in `directory` with nothing written for `ABANDONED_SAVE_AGE_S`."""
  candidates = []
  for name in saves:
    path = os.path.join(directory, name)
    if os.path.islink(path):  # deleting a link frees nothing
      continue
    last = _newest_write([path])
    if last is None or now - last <= ABANDONED_SAVE_AGE_S:
      continue
    # Checked again at the deletion: Orbax names it `<step>.orbax-checkpoint-tmp`, so a relaunch that cleaned the old
    # one and saves the same step again writes under the name that was listed.
    candidates.append(Candidate("abandoned_save", path, _tree_size(path), last,
                                functools.partial(_remove_unless_used, [path], ABANDONED_SAVE_AGE_S, _newest_write)))
  return candidates


def _compile_cache_key(dirpath: str, filename: str) -> str | None:
  """The entry of JAX's compilation cache or of echo_jax's executable cache that `filename` belongs to, or None."""
  if os.path.basename(dirpath) == EXECUTABLES_DIR:
    match = _EXECUTABLE_FILE.match(filename)
  else:
    match = _JAX_CACHE_FILE.match(filename)
  return os.path.join(dirpath, match.group("key")) if match else None


def _compile_cache_candidates(entries: dict[str, list[str]], now: float) -> list[Candidate]:
  """One candidate per entry (its files, by key) not used for `COMPILE_CACHE_UNUSED_S`."""
  candidates = []
  for files in entries.values():
    last = _last_used(files)
    if last is None or now - last <= COMPILE_CACHE_UNUSED_S:
      continue
    # Logged as its -cache or .executable file, the one that holds the program.
    files = sorted(files, key=lambda f: (not f.endswith(("-cache", ".executable")), f))
    size = 0
    for path in files:
      with contextlib.suppress(FileNotFoundError):
        size += os.lstat(path).st_size
    candidates.append(Candidate("compile_cache", files[0], size, last,
                                functools.partial(_remove_unless_used, files, COMPILE_CACHE_UNUSED_S)))
  return candidates


def _file_kind(dirpath: str, filename: str, names: set[str]) -> str | None:
  """The class of a file (one of CLASS_ORDER) that may be deleted, or None."""
  if filename.endswith(PARTIAL_SUFFIXES):
    return "partial_download"
  if filename.endswith(".tar"):
    if filename + CONSUMED_SUFFIX in names or filename[:-len(".tar")] + CONSUMED_SUFFIX in names:
      return "consumed_shard"
    if _SHARD_CACHE_STREAM.search(dirpath):
      return "stale_shard"
  return None


def find_candidates(root: str, keep_checkpoints: int, now: float | None = None) -> list[Candidate]:
  """Everything deletable under `root`, in deletion order: by class, then oldest first."""
  now = time.time() if now is None else now
  found: dict[str, list[Candidate]] = {kind: [] for kind in CLASS_ORDER}
  for dirpath, dirnames, filenames, saves in _walk(root):
    found["abandoned_save"].extend(_abandoned_save_candidates(dirpath, saves, now))
    names = set(filenames)
    compile_cache: dict[str, list[str]] = {}
    for filename in filenames:
      key = _compile_cache_key(dirpath, filename)
      if key is not None:
        compile_cache.setdefault(key, []).append(os.path.join(dirpath, filename))
        continue
      kind = _file_kind(dirpath, filename, names)
      if kind is None:
        continue
      path = os.path.join(dirpath, filename)
      try:
        stat = os.lstat(path)
      except FileNotFoundError:  # deleted since the walk listed it (the shard cache deletes what it has read)
        continue
      if kind not in _UNTOUCHED_FOR_S:
        delete = functools.partial(_remove, path)
      elif now - stat.st_mtime > _UNTOUCHED_FOR_S[kind]:
        delete = functools.partial(_remove_unless_used, [path], _UNTOUCHED_FOR_S[kind], _last_modified)
      else:
        continue
      found[kind].append(Candidate(kind, path, stat.st_size, stat.st_mtime, delete))
    found["compile_cache"].extend(_compile_cache_candidates(compile_cache, now))
    if _is_hf_cache(dirpath, dirnames):
      found["hf_revision"].extend(_hf_candidates(dirpath))
    if os.path.basename(dirpath) == CHECKPOINTS_DIR:
      for candidate in _checkpoint_candidates(dirpath, dirnames, keep_checkpoints):
        found[candidate.kind].append(candidate)
      # Step directories hold only checkpoint files: walking their (many) array chunks would find nothing.
      dirnames[:] = [d for d in dirnames if not d.isdigit()]
  return [c for kind in CLASS_ORDER for c in sorted(found[kind], key=lambda c: c.age_key)]


def _hf_candidates(cache_dir: str) -> list[Candidate]:
  """Every revision of each cached repo except its newest."""
  candidates = []
  cache = huggingface_hub.scan_cache_dir(cache_dir)
  for repo in cache.repos:
    revisions = sorted(repo.revisions, key=lambda r: r.last_modified)
    for revision in revisions[:-1]:
      # What deleting it alone frees: blobs shared with a kept revision stay.
      size = cache.delete_revisions(revision.commit_hash).expected_freed_size
      candidates.append(Candidate(
          "hf_revision", str(revision.snapshot_path), size, revision.last_modified,
          lambda c=cache_dir, h=revision.commit_hash: _delete_hf_revision(c, h)))
  return candidates


def _delete_hf_revision(cache_dir: str, commit_hash: str) -> None:
  # Scanned again at deletion time: earlier deletions change which blobs are still shared with other revisions.
  huggingface_hub.scan_cache_dir(cache_dir).delete_revisions(commit_hash).execute()


def _keep_period(run_dir: str) -> int:
  """The run's `train.keep_period` from its config.json (0, i.e. no milestones, when there is none)."""
  path = os.path.join(run_dir, RUN_CONFIG)
  try:
    with open(path, encoding="utf-8") as f:
      period = json.load(f)["train"].get("keep_period", 0)
    if isinstance(period, bool) or not isinstance(period, int):
      raise TypeError(f"train.keep_period is {period!r}, not an integer")
  except FileNotFoundError:
    return 0
  except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
    logger.warning("cannot read train.keep_period from %s (%s: %s): its run's keep_period milestones are deleted "
                   "like any other checkpoint; fix the file to have them kept longest", path, type(error).__name__,
                   error)
    return 0
  return max(0, period)


def _checkpoint_candidates(directory: str, names: Sequence[str], keep: int) -> list[Candidate]:
  complete = []
  for name in names:
    path = os.path.join(directory, name)
    if name.isdigit() and not os.path.islink(path) and os.path.isfile(os.path.join(path, ORBAX_COMMIT_FILE)):
      complete.append((int(name), path))
  complete.sort()
  # The newest complete checkpoint is the only way back after a crash, so it is kept even when keep is 0.
  deletable = complete[:-max(1, keep)]
  period = _keep_period(os.path.dirname(directory)) if deletable else 0
  return [Candidate("milestone_checkpoint" if period and step % period == 0 else "checkpoint", path, _tree_size(path),
                    step, lambda p=path: _remove(p)) for step, path in deletable]


def _filesystem_groups(paths: Sequence[str]) -> list[list[str]]:
  """The watched paths grouped by the filesystem they live on: free space is a property of the filesystem."""
  groups: dict[int, list[str]] = {}
  for path in paths:
    groups.setdefault(os.stat(path).st_dev, []).append(path)
  return list(groups.values())


def check_paths(paths: Sequence[str]) -> list[str]:
  """The absolute forms of `paths`; raises if any is not an existing directory."""
  missing = [p for p in paths if not os.path.isdir(p)]
  if missing:
    raise FileNotFoundError(f"not a directory: {', '.join(missing)}")
  return [os.path.abspath(p) for p in paths]


def _present(paths: Sequence[str], gone: set[str]) -> list[str]:
  """The watched `paths` that are directories now. One that disappeared since the start (a run directory removed to
  start over) is skipped, with a warning on the first pass it is missing only (`gone` holds those already warned
  of), so that the others are still cleaned; one that comes back is watched again."""
  present = []
  for path in paths:
    if os.path.isdir(path):
      if path in gone:
        gone.remove(path)
        logger.info("%s is back: watching it again", path)
      present.append(path)
    elif path not in gone:
      gone.add(path)
      logger.warning("%s is gone (not a directory any more): skipping it until it comes back; the other paths are "
                     "still watched", path)
  return present


def free_space_once(
    paths: Sequence[str],
    min_free_bytes: int,
    keep_checkpoints: int = 1,
    dry_run: bool = False,
    free_bytes: FreeBytes = disk_free_bytes,
) -> Report:
  """One pass: deletes, in order, until every watched filesystem has `min_free_bytes` free (or nothing is left).

  In a dry run nothing is deleted; the free space each deletion would give is added to the measured free space to
  decide when it would stop.
  """
  if keep_checkpoints < 0:
    raise ValueError(f"keep_checkpoints must be >= 0, got {keep_checkpoints}")
  report = Report()
  for group in _filesystem_groups(check_paths(paths)):
    probe = group[0]
    free = free_bytes(probe)
    if free >= min_free_bytes:
      continue
    logger.warning("%s: %s free, below the %s threshold; freeing space", probe, format_bytes(free),
                   format_bytes(min_free_bytes))
    would_free = 0
    candidates = [c for root in group for c in find_candidates(root, keep_checkpoints)]
    candidates.sort(key=lambda c: (CLASS_ORDER.index(c.kind), c.age_key))
    seen: set[str] = set()
    for candidate in candidates:
      if free + would_free >= min_free_bytes:
        break
      if candidate.path in seen:  # nested watched paths find the same thing twice
        continue
      seen.add(candidate.path)
      if dry_run:
        would_free += candidate.size
        logger.info("dry run: would delete %s %s (%s)", candidate.kind, candidate.path, format_bytes(candidate.size))
      else:
        try:
          candidate.delete()
        except _TouchedSinceListed:
          logger.info("kept %s %s: in use again since it was listed", candidate.kind, candidate.path)
          continue
        except OSError as error:  # one file it may not delete must not keep it from every other
          logger.error("could not delete %s %s: %s; going on with the next", candidate.kind, candidate.path, error)
          continue
        free = free_bytes(probe)
        logger.info("deleted %s %s (%s)", candidate.kind, candidate.path, format_bytes(candidate.size))
      report.deletions.append(Deletion(candidate.kind, candidate.path, candidate.size, dry_run))
    if free + would_free < min_free_bytes:
      report.still_short.append(probe)
      logger.error("!!! DISK SPACE STILL LOW on %s: %s free (threshold %s) and nothing deletable is left. "
                   "Free space by hand or the run will fail. !!!", probe, format_bytes(free + would_free),
                   format_bytes(min_free_bytes))
  return report


def watch(
    paths: Sequence[str],
    min_free_bytes: int,
    interval_s: float,
    keep_checkpoints: int = 1,
    dry_run: bool = False,
    once: bool = False,
    free_bytes: FreeBytes = disk_free_bytes,
) -> Report:
  """Runs `free_space_once` every `interval_s` seconds (or once); returns the last pass's report.

  An error in one pass (a file vanishing mid-scan, a corrupt cache) is logged and the next pass runs anyway: the
  watchdog must outlive anything that goes wrong on the disk it guards. The paths must exist at the start; one that
  disappears later is skipped until it comes back (see `_present`).
  """
  paths = check_paths(paths)
  gone: set[str] = set()
  while True:
    try:
      report = free_space_once(_present(paths, gone), min_free_bytes, keep_checkpoints, dry_run, free_bytes)
    except Exception as error:  # any failure of one pass must not stop the next
      if once:
        raise
      logger.exception("watchdog pass failed: %s", error)
      report = Report()
    if once:
      return report
    time.sleep(interval_s)
