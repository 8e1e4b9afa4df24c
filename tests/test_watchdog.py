"""Tests of the disk watchdog (echo_jax/watchdog.py) on a temp tree with a simulated disk quota."""

from __future__ import annotations

import logging
import os
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
  monkeypatch.setattr(watchdog, "find_candidates", lambda root, keep_checkpoints, now=None: listed)
  caplog.set_level(logging.INFO, logger="echo_jax.watchdog")
  report = watchdog.free_space_once([str(tmp_path)], min_free_bytes=10**9, keep_checkpoints=1,
                                    free_bytes=_quota(tmp_path, 2 * 10**6))
  assert os.path.exists(shard) and not report.deletions
  assert f"kept stale_shard {shard}: in use again since it was listed" in caplog.text


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
