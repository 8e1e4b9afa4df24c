"""Tests of the disk watchdog (echo_jax/watchdog.py) on a temp tree with a simulated disk quota."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest

from echo_jax import watchdog

KB = 1024
OLD = time.time() - 3600  # well past the 10 minutes after which a partial download counts as abandoned


def _file(path, size: int, mtime: float | None = None) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"x" * size)
  if mtime is not None:
    os.utime(path, (mtime, mtime))
  return str(path)


def _checkpoint(ckpt_dir, name: str, size: int, complete: bool) -> str:
  path = ckpt_dir / name
  _file(path / "default" / "d" / "chunk", size)
  _file(path / "_CHECKPOINT_METADATA", 10)
  if complete:
    _file(path / watchdog.ORBAX_COMMIT_FILE, 10)
    _file(path / "default" / watchdog.ORBAX_COMMIT_FILE, 10)
  return str(path)


def _hf_repo(cache, repo: str, revisions: list[tuple[str, float]]) -> list[str]:
  """A Hugging Face hub cache repo in the on-disk layout scan_cache_dir reads, one 8 KB blob per revision."""
  repo_dir = cache / f"models--{repo.replace('/', '--')}"
  snapshots = []
  for i, (commit, mtime) in enumerate(revisions):
    blob = _file(repo_dir / "blobs" / f"{i:040x}", 8 * KB, mtime)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / "model.safetensors")
    snapshots.append(str(snapshot))
  (repo_dir / "refs").mkdir()
  (repo_dir / "refs" / "main").write_text(revisions[-1][0])
  return snapshots


@pytest.fixture
def tree(tmp_path):
  """A disk with one of everything; returns the named paths."""
  paths = {
      "old_incomplete": _file(tmp_path / "hf" / "hub" / "models--org--tts" / "blobs" / "aaaa.incomplete", 5 * KB,
                              OLD - 100),
      "old_part": _file(tmp_path / "downloads" / "shard-9.tar.part", 5 * KB, OLD),
      "fresh_partial": _file(tmp_path / "downloads" / "shard-10.tar.partial", 5 * KB),
      "consumed_old": _file(tmp_path / "shards" / "shard-0.tar", 20 * KB, OLD - 50),
      "consumed_new": _file(tmp_path / "shards" / "shard-1.tar", 20 * KB, OLD),
      "unconsumed": _file(tmp_path / "shards" / "shard-2.tar", 20 * KB, OLD - 500),
      # The trainer's shard cache: shards fetched ahead a day ago by launches never relaunched, and one an hour ago.
      "stale_eval": _file(tmp_path / "cache" / "eval-0123456789ab-process_1" / "stream_0" / "f00d-eval-0.tar", 10 * KB,
                          time.time() - 3 * 86400),
      "stale_train": _file(tmp_path / "cache" / "train-0123456789ab" / "stream_3" / "beef-shard-7.tar", 10 * KB,
                           time.time() - 2 * 86400),
      "fetched_ahead": _file(tmp_path / "cache" / "train-0123456789ab" / "stream_2" / "cafe-shard-8.tar", 10 * KB,
                             OLD),
  }
  _file(tmp_path / "shards" / "shard-0.tar.consumed", 0)
  _file(tmp_path / "shards" / "shard-1.consumed", 0)
  old_rev, mid_rev, new_rev = _hf_repo(tmp_path / "hf" / "hub", "org/tts",
                                       [("1" * 40, OLD - 300), ("2" * 40, OLD - 200), ("3" * 40, OLD - 100)])
  paths.update(hf_old=old_rev, hf_mid=mid_rev, hf_new=new_rev)
  ckpt = tmp_path / "run" / "checkpoints"
  paths.update(
      ckpt_100=_checkpoint(ckpt, "100", 50 * KB, complete=True),
      ckpt_200=_checkpoint(ckpt, "200", 50 * KB, complete=True),
      ckpt_300=_checkpoint(ckpt, "300", 50 * KB, complete=True),
      ckpt_400_tmp=_checkpoint(ckpt, "400.orbax-checkpoint-tmp-1764201234", 50 * KB, complete=False),
      ckpt_500_uncommitted=_checkpoint(ckpt, "500", 50 * KB, complete=False),
  )
  # A partial file inside a save in progress belongs to that save and must stay too.
  paths["tmp_inner_part"] = _file(ckpt / "400.orbax-checkpoint-tmp-1764201234" / "x.part", KB, OLD)
  return tmp_path, paths


def _used(root) -> int:
  total = 0
  for dirpath, _, filenames in os.walk(root):
    for filename in filenames:
      path = os.path.join(dirpath, filename)
      if not os.path.islink(path):
        total += os.path.getsize(path)
  return total


def _quota(root, quota: int):
  """free_bytes of a disk of `quota` bytes holding exactly the tree under `root`."""
  return lambda path: quota - _used(root)


def _snapshot(root) -> set[str]:
  return {os.path.join(d, f) for d, dirs, files in os.walk(root) for f in files + dirs}


def test_frees_in_order_until_nothing_deletable_is_left(tree, caplog):
  root, paths = tree
  caplog.set_level(logging.INFO, logger="echo_jax.watchdog")
  report = watchdog.free_space_once([str(root)], min_free_bytes=10**9, keep_checkpoints=1,
                                    free_bytes=_quota(root, 2 * 10**6))
  deleted = [(d.kind, d.path) for d in report.deletions]
  assert deleted == [
      ("partial_download", paths["old_incomplete"]),
      ("partial_download", paths["old_part"]),
      ("consumed_shard", paths["consumed_old"]),
      ("consumed_shard", paths["consumed_new"]),
      ("stale_shard", paths["stale_eval"]),
      ("stale_shard", paths["stale_train"]),
      ("hf_revision", paths["hf_old"]),
      ("hf_revision", paths["hf_mid"]),
      ("checkpoint", paths["ckpt_100"]),
      ("checkpoint", paths["ckpt_200"]),
  ]
  for key in ("fresh_partial", "unconsumed", "fetched_ahead", "hf_new", "ckpt_300", "ckpt_400_tmp",
              "ckpt_500_uncommitted", "tmp_inner_part"):
    assert os.path.exists(paths[key]), key
  for _, path in deleted:
    assert not os.path.exists(path), path
  assert os.path.exists(os.path.join(paths["hf_new"], "model.safetensors"))  # its blob survived
  assert report.still_short == [str(root)]
  messages = [r.getMessage() for r in caplog.records]
  for _, path in deleted:
    line = next(m for m in messages if path in m)
    assert line.startswith("deleted ") and " KB)" in line
  assert any("DISK SPACE STILL LOW" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_a_file_it_may_not_delete_does_not_keep_it_from_the_others(tree, monkeypatch, caplog):
  """One undeletable file (immutable, or owned by another user) made every pass fail before freeing anything."""
  root, paths = tree
  remove = watchdog._remove

  def refused(path):
    if path == paths["old_incomplete"]:
      raise PermissionError(1, "Operation not permitted", path)
    remove(path)

  monkeypatch.setattr(watchdog, "_remove", refused)
  caplog.set_level(logging.INFO, logger="echo_jax.watchdog")
  report = watchdog.free_space_once([str(root)], min_free_bytes=10**9, keep_checkpoints=1,
                                    free_bytes=_quota(root, 2 * 10**6))
  assert os.path.exists(paths["old_incomplete"]) and not os.path.exists(paths["ckpt_100"])
  assert paths["old_incomplete"] not in [d.path for d in report.deletions] and len(report.deletions) == 9
  assert any(f"could not delete partial_download {paths['old_incomplete']}" in r.getMessage() for r in caplog.records)


def test_a_stale_shard_adopted_after_the_listing_is_kept(tmp_path, monkeypatch, caplog):
  """A relaunch adopts a shard its killed launch fetched ahead days ago (renewing its time) between the watchdog's
  listing and its deletion: the deletion looks at the time again and keeps it."""
  shard = _file(tmp_path / "cache" / "train-0123456789ab-process_0" / "stream_0" / "ab-shard-1.tar", 10 * KB,
                time.time() - 2 * 86400)
  listed = watchdog.find_candidates(str(tmp_path), keep_checkpoints=1)
  assert [(c.kind, c.path) for c in listed] == [("stale_shard", shard)]
  os.utime(shard)  # adopted
  _assert_kept_as_used_since_listed(tmp_path, monkeypatch, caplog, listed, "stale_shard", shard)


def _assert_kept_as_used_since_listed(tmp_path, monkeypatch, caplog, listed, kind, path):
  """A pass over the candidates `listed` earlier keeps `path` (a `kind`), written or read since, and says why."""
  monkeypatch.setattr(watchdog, "find_candidates", lambda root, keep_checkpoints, now=None: listed)
  caplog.set_level(logging.INFO, logger="echo_jax.watchdog")
  report = watchdog.free_space_once([str(tmp_path)], min_free_bytes=10**9, keep_checkpoints=1,
                                    free_bytes=_quota(tmp_path, 2 * 10**6))
  assert os.path.exists(path) and not report.deletions
  assert f"kept {kind} {path}: in use again since it was listed" in caplog.text


def test_stops_as_soon_as_enough_is_free(tree):
  root, paths = tree
  used = _used(root)
  # Free space needed: exactly what the partial downloads and the oldest consumed shard give back.
  quota = used + 1000
  need = 1000 + 5 * KB + 5 * KB + 20 * KB
  report = watchdog.free_space_once([str(root)], min_free_bytes=need, free_bytes=_quota(root, quota))
  assert [d.path for d in report.deletions] == [paths["old_incomplete"], paths["old_part"], paths["consumed_old"]]
  assert os.path.exists(paths["consumed_new"]) and os.path.exists(paths["ckpt_100"])
  assert report.still_short == []


def test_nothing_happens_with_enough_space(tree):
  root, _ = tree
  before = _snapshot(root)
  report = watchdog.free_space_once([str(root)], min_free_bytes=100, free_bytes=lambda p: 10**9)
  assert report.deletions == [] and _snapshot(root) == before


def test_dry_run_deletes_nothing_and_logs_the_plan(tree, caplog):
  root, paths = tree
  caplog.set_level(logging.INFO, logger="echo_jax.watchdog")
  before = _snapshot(root)
  report = watchdog.free_space_once([str(root)], min_free_bytes=10**9, dry_run=True,
                                    free_bytes=_quota(root, 2 * 10**6))
  assert _snapshot(root) == before
  assert [d.path for d in report.deletions][-2:] == [paths["ckpt_100"], paths["ckpt_200"]]
  assert all(d.dry_run for d in report.deletions)
  assert sum("dry run: would delete" in r.getMessage() for r in caplog.records) == len(report.deletions) == 10


def test_newest_complete_checkpoint_kept_even_with_keep_zero(tmp_path):
  ckpt = tmp_path / "checkpoints"
  old = _checkpoint(ckpt, "10", KB, complete=True)
  newest = _checkpoint(ckpt, "20", KB, complete=True)
  saving = _checkpoint(ckpt, "30", KB, complete=False)
  report = watchdog.free_space_once([str(tmp_path)], min_free_bytes=10**9, keep_checkpoints=0,
                                    free_bytes=_quota(tmp_path, 10**6))
  assert [d.path for d in report.deletions] == [old]
  assert os.path.exists(newest) and os.path.exists(saving)


def test_keep_checkpoints_counts_only_complete_ones(tmp_path):
  ckpt = tmp_path / "checkpoints"
  steps = {s: _checkpoint(ckpt, str(s), KB, complete=True) for s in (1, 2, 3, 4)}
  _checkpoint(ckpt, "5", KB, complete=False)
  _checkpoint(ckpt, "6.orbax-checkpoint-tmp", KB, complete=False)
  report = watchdog.free_space_once([str(tmp_path)], min_free_bytes=10**9, keep_checkpoints=2,
                                    free_bytes=_quota(tmp_path, 10**6))
  assert [d.path for d in report.deletions] == [steps[1], steps[2]]


def test_bad_input_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    watchdog.free_space_once([str(tmp_path / "missing")], min_free_bytes=1)
  with pytest.raises(ValueError, match="keep_checkpoints"):
    watchdog.free_space_once([str(tmp_path)], min_free_bytes=1, keep_checkpoints=-1)


def test_cli_dry_run_once(tree):
  root, paths = tree
  before = _snapshot(root)
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "disk_watchdog.py")
  # No way to inject a quota into a subprocess: ask for more free space than any disk has.
  result = subprocess.run([sys.executable, script, "--once", "--dry-run", "--min-free-gb", "1e9", str(root)],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 1, result.stderr
  assert f"would delete checkpoint {paths['ckpt_100']}" in result.stderr
  assert "DISK SPACE STILL LOW" in result.stderr
  assert _snapshot(root) == before


@pytest.mark.parametrize("flag, value", [("--min-free-gb", "nan"), ("--min-free-gb", "inf"), ("--interval", "nan")])
def test_cli_refuses_a_threshold_that_is_not_a_finite_number(tmp_path, flag, value):
  """--min-free-gb nan passed the range check and ended in a ValueError traceback (found by review)."""
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "disk_watchdog.py")
  result = subprocess.run([sys.executable, script, "--once", flag, value, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 2 and "all finite numbers" in result.stderr and "Traceback" not in result.stderr


DAY = 86400.0
KEYS = [f"{i:x}" * 64 for i in range(1, 8)]  # sha256-like keys, one per entry


def _used_at(path, atime: float, mtime: float) -> str:
  os.utime(path, (atime, mtime))
  return str(path)


def test_compilation_cache_entries_unused_for_a_week_go_before_checkpoints(tmp_path, caplog):
  """The default compile_cache_dir (~/.cache/echo_jax/xla) holds JAX's persistent compilation cache and echo_jax's
  compiled steps; neither evicts and every code change adds entries, which the watchdog never deleted: it went on to
  the checkpoints instead (found by review). An entry is used when a launch reads its files (their access time, as
  the default relatime mount updates it) or JAX rewrites its -atime file."""
  xla = tmp_path / "home" / ".cache" / "echo_jax" / "xla"
  now = time.time()
  old = now - 10 * DAY
  paths = {
      "jax_unused": _used_at(_file(xla / f"jit_train_step-{KEYS[0]}-cache", 30 * KB), old, old),
      "jax_read_today": _used_at(_file(xla / f"jit_eval_step-{KEYS[1]}-cache", 30 * KB), now - 3600, old),
      # JAX's own LRU eviction on: a hit rewrites the entry's -atime file.
      "jax_lru_hit": _used_at(_file(xla / f"jit_step-{KEYS[2]}-cache", 30 * KB), old, old),
      "jax_lru_atime": _file(xla / f"jit_step-{KEYS[2]}-atime", 8, now - 3600),
      "exe_unused": _used_at(_file(xla / "echo_executables" / f"{KEYS[3]}.executable", 30 * KB), old + DAY, old),
      "exe_unused_inputs": _used_at(_file(xla / "echo_executables" / f"{KEYS[3]}.inputs", KB), old, old),
      "exe_loaded_today": _used_at(_file(xla / "echo_executables" / f"{KEYS[4]}.executable", 30 * KB), now - 60, old),
      "not_cache_files": _file(xla / "notes-cache", KB, old),
      "jax_lock": _file(xla / ".lockfile", 0, old),
  }
  ckpt = tmp_path / "runs" / "r" / "checkpoints"
  old_ckpt, newest = _checkpoint(ckpt, "100", 50 * KB, complete=True), _checkpoint(ckpt, "200", 50 * KB, complete=True)
  caplog.set_level(logging.INFO, logger="echo_jax.watchdog")
  report = watchdog.free_space_once([str(tmp_path)], min_free_bytes=10**9, keep_checkpoints=1,
                                    free_bytes=_quota(tmp_path, 2 * 10**6))
  assert [(d.kind, d.path) for d in report.deletions] == [
      ("compile_cache", paths["jax_unused"]),
      ("compile_cache", paths["exe_unused"]),
      ("checkpoint", old_ckpt),
  ]
  assert [d.size for d in report.deletions[:2]] == [30 * KB, 31 * KB]  # the executable with its inputs
  for key in ("jax_unused", "exe_unused", "exe_unused_inputs"):
    assert not os.path.exists(paths[key]), key
  for key in ("jax_read_today", "jax_lru_hit", "jax_lru_atime", "exe_loaded_today", "not_cache_files", "jax_lock"):
    assert os.path.exists(paths[key]), key
  assert os.path.exists(newest)
  assert f"deleted compile_cache {paths['jax_unused']} (30.00 KB)" in caplog.text


def test_a_compilation_cache_entry_loaded_after_the_listing_is_kept(tmp_path, monkeypatch, caplog):
  """A launch loads a week-old compiled step between the watchdog's listing and its deletion: the deletion looks at
  the entry's times again and keeps it."""
  folder = tmp_path / "xla" / "echo_executables"
  old = time.time() - 10 * DAY
  executable = _used_at(_file(folder / f"{KEYS[0]}.executable", 10 * KB), old, old)
  inputs = _used_at(_file(folder / f"{KEYS[0]}.inputs", KB), old, old)
  listed = watchdog.find_candidates(str(tmp_path), keep_checkpoints=1)
  assert [(c.kind, c.path) for c in listed] == [("compile_cache", executable)]
  os.utime(inputs, (time.time(), old))  # read by load_inputs
  monkeypatch.setattr(watchdog, "find_candidates", lambda root, keep_checkpoints, now=None: listed)
  caplog.set_level(logging.INFO, logger="echo_jax.watchdog")
  report = watchdog.free_space_once([str(tmp_path)], min_free_bytes=10**9, keep_checkpoints=1,
                                    free_bytes=_quota(tmp_path, 2 * 10**6))
  assert os.path.exists(executable) and os.path.exists(inputs) and not report.deletions
  assert f"kept compile_cache {executable}: in use again since it was listed" in caplog.text


def test_keep_period_milestones_are_the_last_checkpoints_to_go(tmp_path, caplog):
  """Checkpoints went oldest first, so the keep_period milestones, kept by the run beyond its newest checkpoints,
  were the first casualties (found by review). They now go after every other checkpoint; the newest kept ones, a
  milestone among them included, still never go."""
  run = tmp_path / "runs" / "r"
  ckpt = run / "checkpoints"
  steps = {s: _checkpoint(ckpt, str(s), KB, complete=True) for s in (1000, 1500, 2000, 2500, 3000)}
  (run / "config.json").write_text(json.dumps({"train": {"keep_period": 1000, "keep_checkpoints": 3}}))
  # Another run without a config.json: oldest first, as before.
  plain = {s: _checkpoint(tmp_path / "runs" / "plain" / "checkpoints", str(s), KB, complete=True)
           for s in (10, 20, 30)}
  report = watchdog.free_space_once([str(tmp_path)], min_free_bytes=10**9, keep_checkpoints=2,
                                    free_bytes=_quota(tmp_path, 10**6))
  assert [(d.kind, d.path) for d in report.deletions] == [
      ("checkpoint", plain[10]),
      ("checkpoint", steps[1500]),
      ("milestone_checkpoint", steps[1000]),
      ("milestone_checkpoint", steps[2000]),
  ]
  assert all(os.path.exists(p) for p in (steps[2500], steps[3000], plain[20], plain[30]))
  # A config.json that cannot be read: said so, and its checkpoints go oldest first.
  for s in (4000, 4500, 5000):
    _checkpoint(ckpt, str(s), KB, complete=True)
  (run / "config.json").write_text("{cut sh")
  caplog.set_level(logging.INFO, logger="echo_jax.watchdog")
  report = watchdog.free_space_once([str(tmp_path)], min_free_bytes=10**9, keep_checkpoints=2,
                                    free_bytes=_quota(tmp_path, 10**6))
  assert [(d.kind, os.path.basename(d.path)) for d in report.deletions] == [
      ("checkpoint", "2500"), ("checkpoint", "3000"), ("checkpoint", "4000")]
  assert f"cannot read train.keep_period from {run / 'config.json'} (JSONDecodeError" in caplog.text


def _age(path, mtime: float) -> str:
  """Sets the times of `path` and of everything in it to `mtime`, as a save that stopped writing then leaves them."""
  for dirpath, dirnames, filenames in os.walk(path, topdown=False):
    for name in dirnames + filenames:
      os.utime(os.path.join(dirpath, name), (mtime, mtime))
  os.utime(path, (mtime, mtime))
  return str(path)


def test_an_abandoned_save_goes_before_any_complete_checkpoint(tmp_path, caplog):
  """A save killed part-way (by the full disk itself, often) left its temporary directory, which the watchdog never
  deleted whatever its age: it deleted complete checkpoints instead (found by review). A temporary directory with
  nothing written for ABANDONED_SAVE_AGE_S now goes before them; one written since, a save in progress, stays."""
  ckpt = tmp_path / "runs" / "r" / "checkpoints"
  old, newest = _checkpoint(ckpt, "100", 50 * KB, complete=True), _checkpoint(ckpt, "200", 50 * KB, complete=True)
  long_ago = time.time() - watchdog.ABANDONED_SAVE_AGE_S - 3600
  abandoned = _age(_checkpoint(ckpt, "300.orbax-checkpoint-tmp", 60 * KB, complete=False), long_ago)
  # A save in progress: its metadata written long ago (a clock that was wrong, a copied file), an array chunk now.
  saving = _age(_checkpoint(ckpt, "400.orbax-checkpoint-tmp", 60 * KB, complete=False), long_ago)
  _file(ckpt / "400.orbax-checkpoint-tmp" / "default" / "d" / "chunk-2", KB)
  caplog.set_level(logging.INFO, logger="echo_jax.watchdog")
  # A full disk that the abandoned save alone frees enough of.
  report = watchdog.free_space_once([str(tmp_path)], min_free_bytes=50 * KB,
                                    free_bytes=_quota(tmp_path, _used(tmp_path)))
  assert [(d.kind, d.path, d.size) for d in report.deletions] == [("abandoned_save", abandoned, 60 * KB + 10)]
  assert not os.path.exists(abandoned) and os.path.exists(old) and report.still_short == []
  assert f"deleted abandoned_save {abandoned} (60.01 KB)" in caplog.text
  report = watchdog.free_space_once([str(tmp_path)], min_free_bytes=10**9, keep_checkpoints=0,
                                    free_bytes=_quota(tmp_path, 10**6))
  assert [(d.kind, d.path) for d in report.deletions] == [("checkpoint", old)]
  assert os.path.exists(newest) and os.path.exists(saving)


def test_an_abandoned_save_written_again_after_the_listing_is_kept(tmp_path, monkeypatch, caplog):
  """Orbax names a temporary save `<step>.orbax-checkpoint-tmp`: a relaunch that cleaned the abandoned one and saves
  the same step again between the watchdog's listing and its deletion writes under the listed name. The deletion
  looks at the times again and keeps it."""
  ckpt = tmp_path / "checkpoints"
  save = _age(_checkpoint(ckpt, "300.orbax-checkpoint-tmp", 10 * KB, complete=False),
              time.time() - watchdog.ABANDONED_SAVE_AGE_S - 3600)
  listed = watchdog.find_candidates(str(tmp_path), keep_checkpoints=1)
  assert [(c.kind, c.path) for c in listed] == [("abandoned_save", save)]
  _file(ckpt / "300.orbax-checkpoint-tmp" / "default" / "d" / "chunk", 10 * KB)  # the relaunch's save
  _assert_kept_as_used_since_listed(tmp_path, monkeypatch, caplog, listed, "abandoned_save", save)


class _Stop(Exception):
  pass


def test_a_watched_path_that_disappears_is_skipped_and_the_others_still_cleaned(tmp_path, monkeypatch, caplog):
  """`rm -rf runs/demo` to start over while the watchdog ran made every later pass fail on the missing path, so
  nothing was freed anywhere from then on (found by review). The missing path is now skipped, with one warning, and
  watched again once it is back."""
  run, data = tmp_path / "runs" / "demo", tmp_path / "data"
  _file(run / "x.part", KB, OLD)
  _file(data / "0.part", KB, OLD)
  left: list[list[str]] = []  # what each pass left under data/

  def next_pass(seconds: float) -> None:
    left.append(os.listdir(data))
    if len(left) == 1:
      shutil.rmtree(run)
    if len(left) in (1, 2):  # each for the next pass to delete, with the run's directory gone
      _file(data / f"{len(left)}.part", KB, OLD)
    if len(left) == 3:
      _file(run / "y.part", KB, OLD)  # the run started over
    if len(left) == 4:
      raise _Stop

  monkeypatch.setattr(watchdog.time, "sleep", next_pass)
  caplog.set_level(logging.INFO, logger="echo_jax.watchdog")
  with pytest.raises(_Stop):
    watchdog.watch([str(run), str(data)], min_free_bytes=10**9, interval_s=60,
                   free_bytes=_quota(tmp_path, 2 * 10**6))
  assert left == [[], [], [], []] and os.listdir(run) == []
  assert caplog.text.count(f"{run} is gone") == 1 and f"{run} is back" in caplog.text
  assert "watchdog pass failed" not in caplog.text
