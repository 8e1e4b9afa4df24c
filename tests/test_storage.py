"""The run directory's own files on gs:// (echo_jax/storage.py, metrics.JsonlWriter): written whole, appended by
GCS's compose, never overwritten by a resumed run. GCS is stood in for by a local directory served over HTTP
(tests/fake_gcs.py) to the real clients: gcsfs, tensorstore and google-cloud-storage."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import fake_gcs
import fsspec
import numpy as np
import pytest
from conftest import claimed_elsewhere, load_config, wait_for
from test_train import eval_losses_by_step, events, losses_by_step

from echo_jax import checkpoint, dashboard, metrics, storage
from echo_jax.config import write_config_json
from echo_jax.train.loop import Trainer, load_pad_latent
from echo_jax.train.samples import write_sample


@pytest.fixture
def gcs(tmp_path):
  """The stand-in for GCS over tmp_path (bucket `bucket`), reached through gcsfs while the test runs."""
  (tmp_path / "bucket").mkdir()
  with fake_gcs.registered(str(tmp_path)) as server:
    yield server


@pytest.fixture
def bucket(gcs, tmp_path):
  return tmp_path / "bucket"


def lines(path):
  return [json.loads(line)["n"] for line in path.read_text().splitlines()]


def test_jsonl_lines_reach_gs_by_compose_and_a_resumed_run_appends(bucket, gcs):
  """gcsfs opens "a" as "w" (GCS has no append): a resumed run that appended that way would erase the metrics of the
  runs before it. The lines go up in syncs instead, each composed onto the object, which only grows."""
  path = bucket / "run" / "metrics.jsonl"
  writer = metrics.JsonlWriter("gs://bucket/run/metrics.jsonl", sync_seconds=0.05)
  for n in range(3):
    writer.write({"n": n})
  wait_for(lambda: path.exists() and len(lines(path)) == 3)  # by the sync thread, before close
  first = path.read_bytes()
  writer.write({"n": 3})
  writer.close()
  assert lines(path) == [0, 1, 2, 3] and path.read_bytes().startswith(first)
  resumed = metrics.JsonlWriter("gs://bucket/run/metrics.jsonl", sync_seconds=60)
  resumed.write({"n": 4})
  resumed.close()  # the last lines go up at close, whatever the sync period
  assert lines(path) == [0, 1, 2, 3, 4]
  assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.jsonl"]  # no appended chunk is left behind
  # The first sync created the object; each later one (line 3, then the resumed run's line 4) composed onto it.
  assert gcs.composed == ["bucket/run/metrics.jsonl"] * 2


def test_a_saved_checkpoint_has_the_run_log_synced_at_once(bucket):
  """A relaunch resumes from the newest checkpoint and never logs the steps before it again: their lines go up when
  the checkpoint is saved, not up to a sync period later (lost if the process is killed meanwhile)."""
  log = metrics.RunLog("gs://bucket/run", sync_seconds=3600)
  log.metrics.write({"n": 1})
  log.event("start")
  time.sleep(0.5)
  assert not (bucket / "run").exists()  # nothing synced before the period is up
  log.event("checkpoint_saved", step=1)
  wait_for(lambda: (bucket / "run" / "metrics.jsonl").exists() and (bucket / "run" / "events.jsonl").exists())
  assert lines(bucket / "run" / "metrics.jsonl") == [1]
  assert [json.loads(line)["event"] for line in (bucket / "run" / "events.jsonl").read_text().splitlines()] == [
      "start", "checkpoint_saved"]
  log.close()


def test_a_failed_append_is_retried_and_no_line_is_lost(bucket, monkeypatch):
  real_append, failures = storage.append_bytes, []

  def unreachable_once(*args, **kwargs):
    if not failures:
      failures.append(True)
      raise OSError("GCS unreachable")
    real_append(*args, **kwargs)

  monkeypatch.setattr(storage, "append_bytes", unreachable_once)
  writer = metrics.JsonlWriter("gs://bucket/run/events.jsonl", sync_seconds=0.05)
  writer.write({"n": 0})
  wait_for(lambda: failures)
  writer.write({"n": 1})
  writer.close()
  assert lines(bucket / "run" / "events.jsonl") == [0, 1]


def test_exists_asks_the_store_not_an_earlier_listing(bucket):
  """gcsfs answers `exists` from a listing of the parent it made before: a JsonlWriter opened after another process
  wrote the file would take it for new and overwrite it."""
  (bucket / "run").mkdir()
  (bucket / "run" / "config.json").write_text("{}")
  fs, _ = fsspec.core.url_to_fs("gs://bucket/run")
  assert fs.ls("bucket/run") == ["bucket/run/config.json"]
  (bucket / "run" / "metrics.jsonl").write_text('{"n": 0}\n')  # by another process
  assert storage.exists("gs://bucket/run/metrics.jsonl")
  writer = metrics.JsonlWriter("gs://bucket/run/metrics.jsonl", sync_seconds=60)
  writer.write({"n": 1})
  writer.close()
  assert lines(bucket / "run" / "metrics.jsonl") == [0, 1]


def test_an_append_whose_answer_is_lost_is_not_appended_twice(bucket, monkeypatch):
  """The append reached the bucket but its answer did not come back (a dropped connection): retried, its lines would
  be in the file twice."""
  real_append, lost = storage.append_bytes, []

  def answer_lost_once(url, data, *, new):
    real_append(url, data, new=new)
    if not new and not lost:  # the first compose onto the object
      lost.append(True)
      raise OSError("connection reset by peer")

  monkeypatch.setattr(storage, "append_bytes", answer_lost_once)
  path = bucket / "run" / "events.jsonl"
  writer = metrics.JsonlWriter("gs://bucket/run/events.jsonl", sync_seconds=0.05)
  writer.write({"n": 0})
  wait_for(lambda: path.exists())
  writer.write({"n": 1})
  wait_for(lambda: lost)
  writer.write({"n": 2})
  writer.close()
  assert lines(path) == [0, 1, 2]


def test_a_pad_latent_on_gs_is_read_there_and_one_not_finite_is_refused(bucket):
  """A NaN in the pad latent, which pads every short target, would make the losses NaN and be blamed on the data."""
  np.save(bucket / "pad.npy", np.arange(8, dtype=np.float16))
  assert storage.exists("gs://bucket/pad.npy") and not storage.exists("gs://bucket/none.npy")
  np.testing.assert_array_equal(load_pad_latent("gs://bucket/pad.npy", 8), np.arange(8, dtype=np.float32))
  with fsspec.open("gs://bucket/nan.npy", "wb") as f:
    np.save(f, np.array([0.0, np.nan] * 4, np.float16))
  with pytest.raises(ValueError, match=r"pad latent gs://bucket/nan.npy holds NaN or infinite values"):
    load_pad_latent("gs://bucket/nan.npy", 8)


def test_config_and_samples_are_written_into_a_gs_run_directory(bucket):
  config = load_config("tiny")
  write_config_json(config, "gs://bucket/run")
  assert json.loads((bucket / "run" / "config.json").read_text())["model"] == config.model.to_dict()
  write_sample("gs://bucket/run/samples/step_4", 0, "[S1] hello", np.zeros(1600, np.float32), 1600)
  assert sorted(p.name for p in (bucket / "run" / "samples" / "step_4").iterdir()) == ["0.png", "0.txt", "0.wav"]


@pytest.mark.parametrize("denied, operation", [("storage.objects.create", "create"),
                                               ("storage.objects.delete", "replace")])
def test_a_run_directory_the_run_cannot_write_in_fully_is_refused_at_launch(tiny_config, bucket, gcs, denied,
                                                                            operation):
  """Credentials that can create objects but neither replace nor delete them (GCS's objectCreator) let a run train,
  its metrics unsent, until its first checkpoint save failed (tensorstore replaces objects as it writes one) and left
  the step's directory incomplete (seen on the code before this check). The launch refuses them before the
  compile, naming the operation, the permission GCS gave as the cause, and the role."""
  gcs.denied.add(denied)
  with pytest.raises(storage.RunDirectoryError, match=rf"cannot {operation} a file in the run directory "
                                                      rf"gs://bucket/run \(.*Permission '{denied}' denied") as refused:
    Trainer(tiny_config, "gs://bucket/run").run()
  assert "roles/storage.objectUser on the bucket" in str(refused.value)
  assert not (bucket / "run" / "checkpoints").exists()


CLIENT = textwrap.dedent("""\
    import fsspec
    fsspec.get_filesystem_class("gs")  # first, as a user's program may: fsspec then holds gcsfs's default class
    import echo_jax
    from etils import epath
    path = epath.Path("gs://bucket/x")  # as Orbax reaches the bucket
    for cls in fsspec.get_filesystem_class("gs"), fsspec.get_filesystem_class("gcs"), type(path._backend.fs(path)):
      print(f"{cls.__module__}.{cls.__qualname__}")
""")


@pytest.mark.parametrize("switch, client", [(None, "gcsfs.core.GCSFileSystem"),
                                            ("true", "gcsfs.extended_gcsfs.ExtendedGcsFileSystem")])
def test_gs_reaches_the_json_api_client_unless_the_user_chose_another(switch, client):
  """gcsfs's default client asks GCS's gRPC storage-control API each bucket's type before a file operation and, where
  that API cannot be reached, retries that lookup for up to 60 s at every operation; echo_jax uses the JSON-API
  client instead, for its own files and Orbax's alike, unless gcsfs's switch is set. (The subprocess tests reach the
  stand-in through this choice, with no test code of their own in between.)"""
  env = fake_gcs.subprocess_env("http://127.0.0.1:9")  # without the switch, even when this shell has it
  if switch:
    env[storage.GCS_CLIENT_SWITCH] = switch
  result = subprocess.run([sys.executable, "-c", CLIENT], capture_output=True, text=True, timeout=120, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == [client] * 3


def test_a_gs_class_registered_before_echo_jax_is_left_alone():
  """A user's own class for gs:// (a subclass with their settings, say) is theirs: only gcsfs's own is replaced."""
  script = textwrap.dedent("""\
      import fsspec, gcsfs.core
      class Mine(gcsfs.core.GCSFileSystem):
        pass
      fsspec.register_implementation("gs", Mine)
      import echo_jax
      print(fsspec.get_filesystem_class("gs").__qualname__, fsspec.get_filesystem_class("gcs").__module__)
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=fake_gcs.subprocess_env("http://127.0.0.1:9"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["Mine", "gcsfs.core"]


TRAIN = textwrap.dedent("""\
    import json, sys, threading
    import ml_collections
    from echo_jax.train.loop import Trainer
    stop = threading.Event()  # as SIGTERM sets it: the run saves a checkpoint and returns
    hooks = ((1, lambda info: info.step == int(sys.argv[2]) and stop.set()),)
    Trainer(ml_collections.ConfigDict(json.loads(sys.argv[1])), "gs://bucket/run", hooks=hooks,
            stop_requested=stop).run()
""")


def test_a_run_on_gs_keeps_everything_there_and_resumes_exactly(tiny_config, tmp_path):
  """A pod's run: --workdir=gs://BUCKET/run. Checkpoints (Orbax, through tensorstore), config.json, metrics and events
  all go to the bucket, and a relaunch resumes from it with the losses of an uninterrupted run."""
  root = tmp_path / "gcs"
  (root / "bucket").mkdir(parents=True)
  tiny_config.train.update(steps=6, ckpt_every=2, eval_every=2, log_every=1)
  Trainer(tiny_config, str(tmp_path / "local")).run()  # the uninterrupted reference
  with fake_gcs.serve(str(root)) as gcs:
    for stop_at in (3, 0):  # stopped after step 3, then relaunched to the end
      result = subprocess.run([sys.executable, "-c", TRAIN, tiny_config.to_json(), str(stop_at)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env=fake_gcs.subprocess_env(gcs.url, devices=8))
      assert result.returncode == 0, result.stderr[-3000:]
  run = root / "bucket" / "run"
  assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "events.jsonl", "metrics.jsonl"]
  assert not (tmp_path / "gs:").exists()  # where open() put a gs:// run's files before
  assert json.loads((run / "config.json").read_text())["train"]["steps"] == 6
  stopped = [e["step"] for e in events(run) if e["event"] == "stopped"]
  assert len(stopped) == 1 and [e["step"] for e in events(run) if e["event"] == "checkpoint_restored"] == stopped
  assert {"2", str(stopped[0]), "6"} <= {p.name for p in (run / "checkpoints").iterdir()}
  assert losses_by_step(run) == losses_by_step(tmp_path / "local")  # bitwise, steps 1-6
  assert eval_losses_by_step(run) == eval_losses_by_step(tmp_path / "local")
  assert any("checkpoints/4/state" in path for path in gcs.served)  # the restore read the arrays over HTTP
  # What launch.sh tells the user to run: the dashboard of gs://bucket/run.
  with fake_gcs.registered(str(root)):
    status = dashboard.RunState("gs://bucket/run", "pod")
    status.refresh()
    seen = status.status(time.time())
  assert seen["step"] == 6 and seen["listed_checkpoint_step"] == 6 and seen["error"] is None


def test_the_dashboard_of_a_gs_run_sees_checkpoints_and_samples_that_come_later(bucket, monkeypatch):
  """gcsfs keeps a directory's listing until told otherwise: a dashboard that listed `checkpoints` and `samples` once
  must still see the ones a run saves afterwards (written here beside gcsfs, as by the trainer's own process)."""
  monkeypatch.setattr(dashboard, "LISTING_INTERVAL_S", 0.0)
  run = bucket / "run"
  (run / "checkpoints" / "2").mkdir(parents=True)
  (run / "checkpoints" / "2" / "_CHECKPOINT_METADATA").write_text("{}")
  write_sample(str(run / "samples" / "step_2"), 0, "[S1] early", np.zeros(1600, np.float32), 1600)
  state = dashboard.RunState("gs://bucket/run", "pod")
  state.refresh()
  assert state.listed_checkpoint_step == 2 and [s["step"] for s in state.samples] == [2]
  (run / "checkpoints" / "4").mkdir()
  (run / "checkpoints" / "4" / "_CHECKPOINT_METADATA").write_text("{}")
  write_sample(str(run / "samples" / "step_4"), 0, "[S1] later", np.zeros(1600, np.float32), 1600)
  state.refresh()
  assert state.listed_checkpoint_step == 4
  assert [(s["step"], s["items"][0]["text"].strip()) for s in state.samples] == [(4, "[S1] later"), (2, "[S1] early")]


def test_a_process_error_reaches_a_gs_run_directory_and_its_dashboard(bucket, monkeypatch):
  """The error file of a process is written whole into a gs:// run directory, and a dashboard that has listed
  `errors/` before sees the error a later launch writes there."""
  monkeypatch.setattr(dashboard, "LISTING_INTERVAL_S", 0.0)
  (bucket / "run").mkdir()
  state = dashboard.RunState("gs://bucket/run", "pod")
  state.refresh()
  assert state.status(time.time())["process_errors"] == []
  metrics.record_process_error("gs://bucket/run", ValueError("OUT_OF_RANGE: Error reading\nthe shard"), step=2)
  written = json.loads((bucket / "run" / "errors" / "process_0.json").read_text())
  assert written["message"] == "ValueError: OUT_OF_RANGE: Error reading the shard" and written["step"] == 2
  state.refresh()
  assert [(e["process"], e["message"]) for e in state.status(time.time())["process_errors"]] == [
      (0, "ValueError: OUT_OF_RANGE: Error reading the shard")]
  metrics.record_process_error("gs://bucket/run", RuntimeError("relaunched, failed again"))
  state.refresh()
  assert [(e["message"], e["step"]) for e in state.status(time.time())["process_errors"]] == [
      ("RuntimeError: relaunched, failed again", None)]


def test_an_error_file_that_cannot_be_written_is_given_up_on_and_says_so(tmp_path, monkeypatch, caplog):
  """The error file is the process's last word: a write that fails, or hangs on storage that no longer answers, must
  neither raise in place of the error it reports nor hold the process's exit."""
  (tmp_path / "run").write_text("a file where the run directory should be")
  metrics.record_process_error(str(tmp_path / "run"), ValueError("the original error"))
  assert "could not write " in caplog.text and "this error is in this process's log only" in caplog.text
  caplog.clear()
  release = threading.Event()
  monkeypatch.setattr(metrics, "ERROR_WRITE_TIMEOUT_S", 0.2)
  monkeypatch.setattr(storage, "write_bytes", lambda path, data: release.wait(30))
  started = time.monotonic()
  metrics.record_process_error(str(tmp_path / "other"), ValueError("the original error"))
  assert time.monotonic() - started < 5 and "took over 0 s; given up" in caplog.text
  release.set()
  long = ValueError("x" * 600 + " the advice at its end")
  monkeypatch.undo()
  metrics.record_process_error(str(tmp_path / "third"), long)
  message = json.loads((tmp_path / "third" / "errors" / "process_0.json").read_text())["message"]
  assert message.endswith("the advice at its end")  # describe's usual 500 characters would have cut it off


def test_a_local_write_that_fails_leaves_no_partial_file_and_the_check_says_why(tmp_path):
  (tmp_path / "out.wav").mkdir()  # the rename onto a directory fails after the data is written
  with pytest.raises(IsADirectoryError):
    storage.write_bytes(str(tmp_path / "out.wav"), b"RIFF")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]
  with pytest.raises(IsADirectoryError, match="is a directory: give a file name in it"):
    storage.check_writable(str(tmp_path / "out.wav"))
  # Its directories are made at the write, not by the check: a job that failed after it (a checkpoint not found)
  # left them behind (found by review).
  storage.check_writable(str(tmp_path / "new" / "deeper" / "x.wav"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]
  (tmp_path / "file").write_text("a file where a directory of the path should be")
  with pytest.raises(NotADirectoryError):
    storage.check_writable(str(tmp_path / "file" / "new" / "x.wav"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out.wav"]
  storage.check_writable("gs://bucket/x.wav")  # an object store is not asked beforehand


def test_a_second_trainer_on_a_local_run_directory_is_refused_until_the_first_has_ended(tiny_config, tmp_path):
  """A relaunch while the last launch's trainer still ran (its launcher killed, a second terminal) trained beside it
  into the same run directory: both saved checkpoints there and interleaved their metrics. It is now refused before
  the compile, naming the holder, and the claim goes with the holder, even one killed by SIGKILL."""
  workdir = tmp_path / "run"
  with claimed_elsewhere(workdir, 0) as holder:
    with pytest.raises(storage.RunDirectoryError, match=rf"the run directory {workdir} is in use: process 0 of "
                                                        rf"another trainer holds it \(pid {holder} on "):
      Trainer(tiny_config, str(workdir)).run()
    # Nothing written there: no config, no checkpoints, and no error in the holder's events or error files.
    assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()
    assert events(workdir) == [] and not (workdir / "errors").exists()
    storage.RunDirectoryClaim(str(workdir), 1).release()  # another process index is another claim
  claim = storage.RunDirectoryClaim(str(workdir), 0)
  with pytest.raises(storage.RunDirectoryError, match=rf"pid {os.getpid()} on "):  # one process, claimed twice
    storage.RunDirectoryClaim(str(workdir), 0)
  claim.release()
  storage.RunDirectoryClaim(str(workdir), 0).release()


def lease(bucket, run="run"):
  path = bucket / run / storage.LEASE_FILE
  return json.loads(path.read_text()) if path.exists() else None


def test_a_second_trainer_on_a_gs_run_directory_is_refused_while_the_first_holds_its_lease(tiny_config, bucket, gcs):
  """An object store has no lock that a killed trainer releases: process 0 holds a lease there instead. A trainer on
  this machine holds it while its pid runs; one killed by SIGKILL leaves a lease that the next launch takes over at
  once, saying whose it was. Other processes of a launch take none."""
  with claimed_elsewhere("gs://bucket/run", 0, env=fake_gcs.subprocess_env(gcs.url)) as holder:
    # In a process of its own, as a launch: one not refused would train, with Orbax reaching the stand-in.
    result = subprocess.run([sys.executable, "-c", TRAIN, tiny_config.to_json(), "0"], cwd=bucket, capture_output=True,
                            text=True, timeout=300, env=fake_gcs.subprocess_env(gcs.url))
    assert result.returncode == 1 and ("RunDirectoryInUseError: the run directory gs://bucket/run is in use: another "
                                       f"trainer holds its lease (pid {holder} on ") in result.stderr, result.stderr
    assert sorted(p.name for p in (bucket / "run").iterdir()) == [storage.LEASE_FILE]  # nothing of this launch's
    storage.RunDirectoryClaim("gs://bucket/run", 1).release()
  assert lease(bucket)["pid"] == holder  # SIGKILL: the lease stays
  claim = storage.RunDirectoryClaim("gs://bucket/run", 0)
  assert claim.took_over.startswith(f"pid {holder} on ") and lease(bucket)["pid"] == os.getpid()
  claim.release()
  assert lease(bucket) is None  # released: a relaunch elsewhere need not wait for it to expire


def test_a_gs_lease_of_another_machine_holds_until_it_expires(bucket):
  """A trainer on another machine (a second slice running the same command) is live while it renews its lease."""
  (bucket / "run").mkdir()
  other = {"id": "other", "host": "another-host", "pid": 1, "since": "then", "renewed": time.time() - 30}
  (bucket / "run" / storage.LEASE_FILE).write_text(json.dumps(other))
  with pytest.raises(storage.RunDirectoryInUseError, match=r"pid 1 on another-host, since then, last renewed 3\d s "
                                                           r"ago\). .*wait until 300 s have passed since its last "
                                                           r"renewal, or delete gs://bucket/run/.trainer.lease"):
    storage.RunDirectoryClaim("gs://bucket/run", 0)
  assert lease(bucket) == other
  other["renewed"] = time.time() - storage.LEASE_EXPIRES_S - 1
  (bucket / "run" / storage.LEASE_FILE).write_text(json.dumps(other))
  claim = storage.RunDirectoryClaim("gs://bucket/run", 0)
  assert claim.took_over.startswith("pid 1 on another-host, since then, last renewed 30") and claim.lost is None
  claim.release()


def test_a_gs_lease_is_judged_by_its_process_on_this_machine_not_by_the_hostname(bucket):
  """A hostname proves nothing (found by review): a pid used again after the holder died (here: this test's parent,
  with another start time) refused every relaunch for good, and a live trainer of the same hostname whose pid is not
  visible here (another pid namespace, another machine) was taken over at once."""
  (bucket / "run").mkdir()
  lease_path = bucket / "run" / storage.LEASE_FILE
  reused = {"id": "dead", "host": socket.gethostname(), "pid": os.getppid(), "since": "then",
            "renewed": time.time() - 3600, "machine": storage._machine(), "started": 1}
  lease_path.write_text(json.dumps(reused))
  claim = storage.RunDirectoryClaim("gs://bucket/run", 0)
  assert claim.took_over.startswith(f"pid {os.getppid()} on {socket.gethostname()}")
  claim.release()
  elsewhere = {**reused, "id": "live", "pid": 4_000_000, "renewed": time.time() - 2, "machine": "another-boot/pid:[1]"}
  lease_path.write_text(json.dumps(elsewhere))
  with pytest.raises(storage.RunDirectoryInUseError, match=r"pid 4000000 on .*last renewed [23] s ago"):
    storage.RunDirectoryClaim("gs://bucket/run", 0)
  live_here = {**reused, "id": "live here", "started": storage._process_start(os.getppid()), "renewed": 0}
  lease_path.write_text(json.dumps(live_here))  # on this machine the process tells, however old the renewal
  with pytest.raises(storage.RunDirectoryInUseError, match=rf"pid {os.getppid()} on "):
    storage.RunDirectoryClaim("gs://bucket/run", 0)


def test_a_gs_lease_is_renewed_made_again_when_deleted_and_lost_to_another_launch(bucket, monkeypatch):
  monkeypatch.setattr(storage, "LEASE_RENEW_S", 0.05)
  claim = storage.RunDirectoryClaim("gs://bucket/run", 0)
  first = lease(bucket)["renewed"]
  wait_for(lambda: lease(bucket) and lease(bucket)["renewed"] > first, timeout=10)
  (bucket / "run" / storage.LEASE_FILE).unlink()  # by hand: made again, the trainer goes on
  wait_for(lambda: lease(bucket) is not None, timeout=10)
  assert claim.lost is None
  taken = {**lease(bucket), "id": "another launch", "pid": 1, "host": "another-host"}
  (bucket / "run" / storage.LEASE_FILE).write_text(json.dumps(taken))
  wait_for(lambda: claim.lost is not None, timeout=10)
  assert claim.lost.startswith("another trainer took over the run directory gs://bucket/run (pid 1 on another-host")
  claim.release()
  assert lease(bucket) == taken  # not this trainer's to delete


def test_of_two_launches_taking_over_one_expired_gs_lease_at_once_the_store_lets_one(bucket, gcs, monkeypatch):
  """Both read the expired lease before either wrote: both replaced it (GCS replaced it without a condition), and
  both trained into the run directory until a renewal found the other's lease. The replacement is conditioned on
  the generation read: the store lets the first, and the second is refused, naming it."""
  (bucket / "run").mkdir()
  expired = {"id": "expired", "host": "another-host", "pid": 1, "since": "then",
             "renewed": time.time() - storage.LEASE_EXPIRES_S - 1}
  (bucket / "run" / storage.LEASE_FILE).write_text(json.dumps(expired))
  real_read, other_launch, others = storage._read_lease, contextlib.ExitStack(), []

  def read_then_another_launch_takes_it_over(path):  # this launch has read the expired lease, and not yet written
    read = real_read(path)
    monkeypatch.setattr(storage, "_read_lease", real_read)
    others.append(other_launch.enter_context(
        claimed_elsewhere("gs://bucket/run", 0, env=fake_gcs.subprocess_env(gcs.url))))
    return read

  monkeypatch.setattr(storage, "_read_lease", read_then_another_launch_takes_it_over)
  with other_launch:
    with pytest.raises(storage.RunDirectoryInUseError) as refused:
      storage.RunDirectoryClaim("gs://bucket/run", 0)
    assert (f"is in use: another trainer holds its lease (pid {others[0]} on {socket.gethostname()}, since "
            in str(refused.value)), refused.value
    assert lease(bucket)["pid"] == others[0]


def test_a_gs_lease_renewal_does_not_overwrite_a_lease_another_launch_took_since_it_read_it(bucket, monkeypatch):
  """A renewal that read its own lease, then wrote after another launch took the lease over, replaced that launch's
  lease: both trained on until the other's renewal. Its write is conditioned on the generation read: it fails, and
  the trainer finds its lease lost."""
  monkeypatch.setattr(storage, "LEASE_RENEW_S", 0.05)
  claim = storage.RunDirectoryClaim("gs://bucket/run", 0)
  real_read = storage._read_lease
  taken = {"id": "another launch", "host": "another-host", "pid": 1, "since": "now", "renewed": time.time()}

  def read_then_another_launch_takes_it_over(path):  # this renewal has read its own lease, and not yet written
    read = real_read(path)
    monkeypatch.setattr(storage, "_read_lease", real_read)
    storage.write_bytes(path, json.dumps(taken).encode())
    return read

  monkeypatch.setattr(storage, "_read_lease", read_then_another_launch_takes_it_over)
  wait_for(lambda: claim.lost is not None, timeout=10)
  assert claim.lost.startswith("another trainer took over the run directory gs://bucket/run (pid 1 on another-host")
  assert lease(bucket) == taken
  claim.release()
  assert lease(bucket) == taken


def test_a_released_gs_lease_that_another_launch_took_over_since_it_was_read_is_kept(bucket, monkeypatch):
  """The release read the lease, found it its own, and deleted it: a lease another launch wrote between the read and
  the delete was deleted with it (a third launch could then take the run directory from a live trainer). The
  delete is conditioned on the generation read: the store refuses it, and the other launch's lease stays."""
  claim = storage.RunDirectoryClaim("gs://bucket/run", 0)
  real_read = storage._read_lease
  taken = {"id": "another launch", "host": "another-host", "pid": 1, "since": "now", "renewed": time.time()}

  def read_then_another_launch_takes_it_over(path):  # the release has read its own lease, and not yet deleted it
    read = real_read(path)
    storage.write_bytes(path, json.dumps(taken).encode())
    return read

  monkeypatch.setattr(storage, "_read_lease", read_then_another_launch_takes_it_over)
  claim.release()
  assert lease(bucket) == taken
  monkeypatch.setattr(storage, "_read_lease", real_read)
  storage.RunDirectoryClaim("gs://bucket/run", 1).release()  # a process but 0 holds no lease, and deletes none
  assert lease(bucket) == taken
  mine = storage.RunDirectoryClaim("gs://bucket/other", 0)
  assert lease(bucket, "other")["id"] == mine._lease_id
  mine.release()
  assert lease(bucket, "other") is None  # a release that nothing came between deletes the lease


def test_a_gs_lease_write_whose_answer_was_lost_is_found_to_be_this_trainers(bucket, monkeypatch):
  """gcsfs retries a request whose answer was lost: a lease write that went through is retried, and the store
  refuses the retry (the generation it was conditioned on is gone). The launch still holds the lease it took over,
  and a renewal does not take its own lease for another launch's."""
  monkeypatch.setattr(storage, "LEASE_RENEW_S", 0.05)
  (bucket / "run").mkdir()
  expired = {"id": "expired", "host": "another-host", "pid": 1, "since": "then",
             "renewed": time.time() - storage.LEASE_EXPIRES_S - 1}
  (bucket / "run" / storage.LEASE_FILE).write_text(json.dumps(expired))
  real_replace, answers_lost = storage._replace_lease, []

  def replace_and_lose_the_answer(path, data, generation):
    real_replace(path, data, generation)
    answers_lost.append(path)
    raise FileExistsError(path)

  monkeypatch.setattr(storage, "_replace_lease", replace_and_lose_the_answer)
  claim = storage.RunDirectoryClaim("gs://bucket/run", 0)
  assert claim.took_over.startswith("pid 1 on another-host, since then") and lease(bucket)["pid"] == os.getpid()
  wait_for(lambda: len(answers_lost) >= 3, timeout=10)  # the take-over and two renewals
  assert claim.lost is None
  claim.release()
  assert lease(bucket) is None


def train_on_gs(tmp_path, script, config):
  """Runs `script`, a trainer of `config` into gs://bucket/run, in a process of its own against the GCS stand-in
  over tmp_path/gcs; returns its result and where the stand-in keeps the run directory."""
  root = tmp_path / "gcs"
  (root / "bucket").mkdir(parents=True)
  with fake_gcs.serve(str(root)) as gcs:
    result = subprocess.run([sys.executable, "-c", script, config.to_json()], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=fake_gcs.subprocess_env(gcs.url))
  return result, root / "bucket" / "run"


# A trainer on gs:// killed (SIGKILL) as soon as its save of step 2 is written, its run log synced only every hour.
KILLED_AFTER_SAVE = textwrap.dedent("""\
    import json, os, signal, sys
    import ml_collections
    from echo_jax import checkpoint, metrics
    from echo_jax.train.loop import Trainer
    metrics.SYNC_SECONDS = 3600.0
    real_save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args):
      real_save(self, step, *args)
      self.wait()
      if step == 2:
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Checkpointer.save = save_then_die
    Trainer(ml_collections.ConfigDict(json.loads(sys.argv[1])), "gs://bucket/run").run()
""")


def test_a_trainer_killed_right_after_a_save_on_gs_has_logged_every_step_up_to_it(tiny_config, tmp_path):
  """A relaunch resumes after the newest checkpoint and never logs the steps before it again. On gs:// the run log's
  lines wait for their periodic append: a trainer killed once its save was written (a preemption's grace running
  out) lost them for good (the sync asked for at `checkpoint_saved` came too late). They are appended before each
  save now, the save's own step included."""
  tiny_config.train.update(steps=6, ckpt_every=2, eval_every=0, log_every=1)
  result, run = train_on_gs(tmp_path, KILLED_AFTER_SAVE, tiny_config)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  assert (run / "checkpoints" / "2" / "commit_success.txt").exists()
  assert sorted(losses_by_step(run)) == [1, 2]
  assert [e["event"] for e in events(run)] == ["start"]


TAKEN_OVER = textwrap.dedent("""\
    import json, sys
    import ml_collections
    from echo_jax import storage
    from echo_jax.train.loop import Trainer
    storage.LEASE_RENEW_S = 0.05

    def take_over(info):  # another launch takes the lease over while this one trains
      path = "gs://bucket/run/" + storage.LEASE_FILE
      record = json.loads(storage.read_bytes(path))
      storage.write_bytes(path, json.dumps({**record, "id": "another launch", "host": "another-host"}).encode())
      while info.trainer._claim.lost is None:
        pass

    Trainer(ml_collections.ConfigDict(json.loads(sys.argv[1])), "gs://bucket/run", hooks=((4, take_over),)).run()
""")


def test_a_trainer_whose_gs_lease_was_taken_over_stops_before_its_next_save(tiny_config, tmp_path):
  """Both would otherwise save into one checkpoints/ directory (a trainer that could not renew its lease for
  LEASE_EXPIRES_S, e.g. cut off from the store, and a relaunch elsewhere that took the run over). It stops at its
  next log step: it went on training and writing into the other's run log until its next save (found by review)."""
  tiny_config.train.update(steps=12, ckpt_every=4, eval_every=0, log_every=1)
  result, run = train_on_gs(tmp_path, TAKEN_OVER, tiny_config)
  assert result.returncode == 1
  assert ("RunDirectoryInUseError: another trainer took over the run directory gs://bucket/run (pid "
          in result.stderr), result.stderr[-3000:]
  assert "this trainer stopped without saving; the other one goes on" in result.stderr
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4"]  # not 8
  assert json.loads((run / storage.LEASE_FILE).read_text())["id"] == "another launch"
  # No error in the other's run log, and no step after the one it learnt of the take-over at.
  assert [e["event"] for e in events(run)] == ["start", "checkpoint_saved"]
  assert max(losses_by_step(run)) <= 5


def test_an_interrupted_save_on_gs_is_found_and_reported(bucket, gcs, monkeypatch):
  """On gs:// Orbax writes a step in place and marks it complete with commit_success.txt at the end: a step
  directory without it is an interrupted save. Only temporary names were looked for, so a pod's interrupted saves
  went unreported (found by review)."""
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)  # Orbax asks google-cloud-storage for the bucket's settings
  for step, files in (("10", ["_CHECKPOINT_METADATA", "commit_success.txt"]), ("20", ["_CHECKPOINT_METADATA"])):
    (bucket / "run" / "checkpoints" / step).mkdir(parents=True)
    for name in files:
      (bucket / "run" / "checkpoints" / step / name).write_text("{}")
  ckpt = checkpoint.Checkpointer("gs://bucket/run/checkpoints", keep=3)
  try:
    assert ckpt.incomplete == ["20"]
  finally:
    ckpt.close()



def test_a_local_run_log_whose_last_line_was_cut_off_gets_the_next_line_on_its_own(tmp_path):
  """A full disk (or a kill mid-write) cut a metrics line short; the relaunch's first line was glued onto it, and a
  reader lost both (found by review)."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"n": 1}\n{"n": 2, "lo')
  writer = metrics.JsonlWriter(str(path))
  writer.write({"n": 3})
  writer.close()
  assert path.read_text().splitlines() == ['{"n": 1}', '{"n": 2, "lo', '{"n": 3}']
  writer = metrics.JsonlWriter(str(path))  # a whole last line: nothing added
  writer.write({"n": 4})
  writer.close()
  assert path.read_text().splitlines()[-2:] == ['{"n": 3}', '{"n": 4}']
  empty = metrics.JsonlWriter(str(tmp_path / "new.jsonl"))
  empty.write({"n": 1})
  empty.close()
  assert (tmp_path / "new.jsonl").read_text() == '{"n": 1}\n'


def test_a_released_gs_lease_is_not_made_again_by_a_renewal_under_way(bucket, monkeypatch):
  """A renewal whose upload was under way at the release landed after the delete: the lease stayed, and a relaunch
  elsewhere was refused for LEASE_EXPIRES_S (found by review)."""
  monkeypatch.setattr(storage, "LEASE_RENEW_S", 0.05)
  claim = storage.RunDirectoryClaim("gs://bucket/run", 0)
  real_replace, renewing = storage._replace_lease, threading.Event()

  def slow_replace(path, data, generation):
    renewing.set()
    time.sleep(1.0)
    real_replace(path, data, generation)

  monkeypatch.setattr(storage, "_replace_lease", slow_replace)
  assert renewing.wait(10)
  claim.release()
  time.sleep(1.5)
  assert lease(bucket) is None
