"""Multi-host training on localhost: 2 real processes × 4 CPU devices (JAX distributed runtime, gloo).

The global batch depends on the data streams only, so a 2-process run matches a 1-process run, its checkpoints
restore onto other layouts, one host's bad data does not hang the other, and SIGTERM stops both at one step. The main
run writes to gs:// (the GCS stand-in, tests/fake_gcs.py), as a pod's does.
"""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import fake_gcs
import jax
import numpy as np
import pytest
from conftest import REPO, claimed_elsewhere, cpu_env, free_port, load_config, write_synthetic_shards
from test_train import losses_by_step, read_jsonl, write_malformed_shard

from echo_jax.data.pipeline import stream_shards
from echo_jax.data.shards import list_shards
from echo_jax.train.loop import Trainer

STEPS = 24
PER_SHARD = 5
NUM_SHARDS = 6
TIMEOUT_S = 240
LOG_EVERY = 4
LOGGED = range(LOG_EVERY, STEPS + 1, LOG_EVERY)  # the steps whose losses metrics.jsonl holds

# One simulated host: joins the runtime from ECHO_* variables as train_main does (`join_hosts`), records
# the texts of the rows it loads (one JSON list per step) when asked, sleeps after each step when asked (so a signal
# lands mid-run), sends process 1 a SIGTERM right after step `signal_at` (and its save, if it has one) when asked
# (with -2: 2 s after its run returned), and prints its final step.
WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    import jax
    from echo_jax.train.entry import join_hosts
    from echo_jax.train.loop import Trainer
    print("joining", flush=True)
    stop = join_hosts()
    import ml_collections
    import numpy as np

    config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
    workdir, texts_path, delay, signal_at = sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    if workdir.startswith("["):  # a workdir per host: storage the hosts do not all share
      workdir = json.loads(workdir)[jax.process_index()]

    class Recording:
      def __init__(self, pipeline):
        self.pipeline = pipeline
        self.file = open(f"{texts_path}.{jax.process_index()}", "a")

      def __next__(self):
        batch = next(self.pipeline)
        rows = zip(batch["text"], batch["text_mask"])
        texts = [bytes(row[1:][mask[1:]].astype(np.uint8)).decode() for row, mask in rows]
        self.file.write(json.dumps(texts) + "\\n")
        self.file.flush()
        return batch

      def state(self):
        return self.pipeline.state()

      def align(self, position):
        return self.pipeline.align(position)

      def close(self):
        self.file.close()
        self.pipeline.close()

    class RecordingTrainer(Trainer):
      def _pipeline(self, role, shards, seed, position=None, **kwargs):
        pipeline = super()._pipeline(role, shards, seed, position, **kwargs)
        return pipeline if texts_path == "-" else Recording(pipeline)

    def after_step(info):
      time.sleep(delay)
      if info.step == signal_at and jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(3)  # a slow hook: the other process waits in the next step's collective

    if os.environ.get("ECHO_TEST_INTERLEAVE"):
      # A TPU slice's kind of mesh: it follows the torus, so the hosts interleave along the batch, here
      # ECHO_TEST_INTERLEAVE devices of each at a time.
      from echo_jax import sharding
      make_mesh, run = sharding.make_mesh, int(os.environ["ECHO_TEST_INTERLEAVE"])

      def interleaved(sizes, devices=None):
        hosts = [[d for d in jax.devices() if d.process_index == p] for p in range(jax.process_count())]
        return make_mesh(sizes, [d for i in range(0, len(hosts[0]), run) for host in hosts for d in host[i:i + run]])
      sharding.make_mesh = interleaved

    unreadable = os.environ.get("ECHO_TEST_UNREADABLE_ONCE")
    if unreadable and jax.process_index() == 1:
      # Process 1 cannot read that shard the first time (a download given up after its retries); later it can.
      from echo_jax.data import pipeline as pipeline_module
      read_shard, failed = pipeline_module.iter_shard, []

      def iter_shard_failing_once(path, on_skip, **kwargs):
        if os.path.basename(path) == unreadable and not failed:
          failed.append(path)
          on_skip("unreadable_shard", "", path, "download failed: the test's")
          return iter(())
        return read_shard(path, on_skip, **kwargs)
      pipeline_module.iter_shard = iter_shard_failing_once

    hooks = ((1, after_step),)
    calls_path = os.environ.get("ECHO_TEST_SAMPLE_CALLS")
    if calls_path:
      # The training samples' hook as train_main makes it, recording what this process does for it: its listings and
      # reads of the held-out shards, and the leaves of each of its tiled gathers (a run makes no other).
      from jax.experimental import multihost_utils
      from echo_jax.train import entry, samples
      calls = []

      def recorded(name, fn, arguments):
        def call(*args, **kwargs):
          calls.append([name, arguments(*args, **kwargs)])
          return fn(*args, **kwargs)
        return call

      samples.list_shards = recorded("list_shards", samples.list_shards, lambda spec: spec)
      samples.iter_shard = recorded("iter_shard", samples.iter_shard, lambda path, *_, **__: os.path.basename(path))
      multihost_utils.process_allgather = recorded(
          "gather", multihost_utils.process_allgather, lambda tree, tiled=False: len(jax.tree.leaves(tree)) if tiled
          else None)
      hooks += entry.sample_hooks(config)
    trainer = RecordingTrainer(config, workdir, hooks=hooks, stop_requested=stop)
    print(f"batch_rows={trainer.batch_rows}", flush=True)
    state = trainer.run()
    print(f"final_step={int(state.step.addressable_data(0))}", flush=True)
    if calls_path:
      with open(f"{calls_path}.{jax.process_index()}", "w") as f:
        json.dump(calls, f)
    if signal_at == -2 and jax.process_index() == 1:  # a SIGTERM once process 0 has begun to exit
      time.sleep(2)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.5)
""")


def start_hosts(config, workdir, *, processes=2, devices=4, texts="-", delay=0.0, signal_at=-1, port=None,
                indices=None, gcs_url=None, interleave=0, sample_calls=None, unreadable_once=None):
  """Starts `processes` simulated hosts of `devices` CPU devices each (those of `indices` only, when given, joining
  the coordinator on `port`; reaching gs:// at the GCS stand-in's `gcs_url`, when given; with `interleave`, on a
  mesh whose devices alternate between the hosts that many at a time; with `sample_calls`, with the training samples'
  hook, each host writing what it did for it to `{sample_calls}.{process}`; with `unreadable_once`, a shard's file
  name, process 1 failing to read that shard the first time); returns the Popen objects."""
  port = port or free_port()
  started = []
  for index in range(processes) if indices is None else indices:
    env = fake_gcs.subprocess_env(gcs_url, devices) if gcs_url else cpu_env(devices)
    if processes > 1:
      env.update(ECHO_COORDINATOR=f"127.0.0.1:{port}", ECHO_NUM_PROCESSES=str(processes),
                 ECHO_PROCESS_ID=str(index))
    if interleave:
      env["ECHO_TEST_INTERLEAVE"] = str(interleave)
    if sample_calls:
      env["ECHO_TEST_SAMPLE_CALLS"] = str(sample_calls)
    if unreadable_once:
      env["ECHO_TEST_UNREADABLE_ONCE"] = unreadable_once
    started.append(subprocess.Popen(
        [sys.executable, "-c", WORKER, config.to_json(), str(workdir), str(texts), str(delay), str(signal_at)],
        cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return started


def finish(started, timeout=TIMEOUT_S):
  """Waits for every host; kills all of them when one fails or time runs out. Returns their outputs."""
  deadline = time.time() + timeout
  try:
    for process in started:
      process.wait(timeout=max(1, deadline - time.time()))
  finally:
    for process in started:
      if process.poll() is None:
        process.kill()
  outputs = [process.stdout.read() for process in started]
  for process, output in zip(started, outputs, strict=True):
    assert process.returncode == 0, output[-4000:]
  return outputs


def failed(started):
  """The outputs of hosts that must all fail (within TIMEOUT_S; killed after it)."""
  try:
    outputs = [process.communicate(timeout=TIMEOUT_S)[0] for process in started]
  finally:
    for process in started:
      if process.poll() is None:
        process.kill()
  assert all(process.returncode != 0 for process in started), outputs
  return outputs


def run_hosts(config, workdir, **kwargs):
  return finish(start_hosts(config, workdir, **kwargs))


def final_steps(outputs):
  return [int(line.split("=")[1]) for output in outputs for line in output.splitlines()
          if line.startswith("final_step=")]


def make_config(shards, cache_dir):
  config = load_config("tiny")
  config.data.train_shards = shards
  config.data.streams = 2
  config.data.cache_dir = str(cache_dir)
  # Data parallel: far fewer cross-process collectives than FSDP, which matters for gloo on a small CPU machine.
  config.mesh.update(data=-1, fsdp=1)
  config.train.update(steps=STEPS, log_every=LOG_EVERY, ckpt_every=8, keep_checkpoints=5, eval_every=0)
  return config


def assert_losses_match(run, reference, steps):
  np.testing.assert_allclose([run[s] for s in steps], [reference[s] for s in steps], rtol=2e-4, atol=1e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """The data, the config and a 1-process × 8-device reference run of it."""
  root = tmp_path_factory.mktemp("multihost")
  shards = write_synthetic_shards(root / "shards", num_shards=NUM_SHARDS, per_shard=PER_SHARD)
  config = make_config(shards, root / "cache")
  assert jax.device_count() == 8
  Trainer(config, str(root / "reference")).run()
  return root, config, losses_by_step(root / "reference")


@pytest.fixture(scope="module")
def two_host_run(setup):
  """A 2 × 4 run into gs://bucket/two_hosts, a pod's kind of run directory (here the GCS stand-in, through gcsfs and
  tensorstore), that gets SIGTERM on process 1 after step 8, then is relaunched to the end.

  Returns (the run directory as the stand-in keeps it on disk, the step both processes stopped at, the final steps the
  relaunch printed, the objects the stand-in served).
  """
  root, config, _ = setup
  (root / "gcs" / "bucket").mkdir(parents=True)
  workdir = root / "gcs" / "bucket" / "two_hosts"
  with fake_gcs.serve(str(root / "gcs")) as gcs:
    started = start_hosts(config, "gs://bucket/two_hosts", texts=root / "texts", delay=0.3, gcs_url=gcs.url)
    deadline = time.time() + TIMEOUT_S
    # The metrics reach the bucket when a checkpoint is saved (or every 10 s).
    while not (os.path.exists(workdir / "metrics.jsonl") and max(losses_by_step(workdir), default=0) >= 8):
      assert time.time() < deadline and all(p.poll() is None for p in started), "the run did not get going"
      time.sleep(0.1)
    started[1].send_signal(signal.SIGTERM)
    stops = final_steps(finish(started))
    assert len(stops) == 2 and stops[0] == stops[1], stops
    relaunch = final_steps(run_hosts(config, "gs://bucket/two_hosts", gcs_url=gcs.url))
  assert not (REPO / "gs:").exists()  # where a run directory's files went when written with open()
  return workdir, stops[0], relaunch, gcs.served


def test_two_hosts_match_one_host_and_read_disjoint_samples(setup, two_host_run):
  root, _, reference = setup
  workdir, stop, _, _ = two_host_run
  assert not list(workdir.glob(".storage_check*"))  # each host's marks of the workdir check, deleted once read
  losses = losses_by_step(workdir)
  assert sorted(losses) == list(LOGGED)
  assert_losses_match(losses, reference, LOGGED)

  # Each process owns one stream of 3 shards (15 samples an epoch): its first 15 rows are one epoch.
  epoch = PER_SHARD * NUM_SHARDS // 2
  first_epoch = []
  for process in range(2):
    with open(f"{root / 'texts'}.{process}", encoding="utf-8") as f:
      rows = [text for line in f for text in json.loads(line)]
    assert len(rows) == stop * 4
    first_epoch.append(rows[:epoch])
    assert len(set(rows[:epoch])) == epoch, rows[:epoch]
  assert set(first_epoch[0]).isdisjoint(first_epoch[1])
  assert len(set(first_epoch[0]) | set(first_epoch[1])) == PER_SHARD * NUM_SHARDS


def test_hosts_interleaved_along_the_batch_match_one_host(setup):
  """On a TPU slice the mesh follows the chips' torus and the hosts interleave along the batch (each host of a v4-64
  holds 4 blocks of rows). Here the devices alternate two at a time, [p0 p0 p1 p1 p0 p0 p1 p1]: each process holds two
  blocks of 2 rows of 8, filled by 2 of data.streams=4, and the losses are those of one process over 8 devices."""
  root, config, _ = setup
  config = copy.deepcopy(config)
  config.data.streams = 4
  config.train.update(steps=8, ckpt_every=8)
  Trainer(config, str(root / "reference_4_streams")).run()
  outputs = run_hosts(config, root / "interleaved", interleave=2)
  assert "batch_rows=[(0, 2), (4, 6)]" in outputs[0] and "batch_rows=[(2, 4), (6, 8)]" in outputs[1], outputs[0]
  assert_losses_match(losses_by_step(root / "interleaved"), losses_by_step(root / "reference_4_streams"), [4, 8])


def test_sigterm_to_one_host_stops_both_at_one_step_and_resume_is_exact(setup, two_host_run):
  _, _, reference = setup
  workdir, stop, relaunch, served = two_host_run
  # Both saved at one step (JAX's preemption sync point), after the signal and before the end.
  assert 8 < stop < STEPS, stop
  log = read_jsonl(workdir / "events.jsonl")
  assert any(e["event"] == "stopped" and e["step"] == stop for e in log)
  assert any(e["event"] == "checkpoint_saved" and e["step"] == stop for e in log)
  assert [e["step"] for e in log if e["event"] == "checkpoint_restored"] == [stop]
  assert any(f"two_hosts/checkpoints/{stop}/" in path for path in served)  # restored from the bucket, over HTTP
  assert relaunch == [STEPS, STEPS]
  assert_losses_match(losses_by_step(workdir), reference, [s for s in LOGGED if s > stop])


def test_sigterm_while_the_hosts_join_stops_both_after_their_first_step(setup):
  """A SIGTERM to process 0 while it waits for process 1 to join comes before JAX's preemption notifier exists: the
  entry's handler catches it and the Trainer hands it on as this process's notice, so both save after one step."""
  root, config, _ = setup
  workdir = root / "stopped_while_joining"
  port = free_port()
  first = start_hosts(config, workdir, port=port, indices=[0])
  lines = []
  for line in iter(first[0].stdout.readline, ""):
    lines.append(line)
    if line.startswith("joining"):
      break
  assert lines and lines[-1].startswith("joining"), "".join(lines)
  time.sleep(2)  # inside jax.distributed.initialize, waiting for process 1
  first[0].send_signal(signal.SIGTERM)
  outputs = finish(first + start_hosts(config, workdir, port=port, indices=[1]))
  assert final_steps(outputs) == [1, 1], [output[-3000:] for output in outputs]
  log = read_jsonl(workdir / "events.jsonl")
  assert [e["step"] for e in log if e["event"] == "stopped"] == [1]
  assert [e["step"] for e in log if e["event"] == "checkpoint_saved"] == [1]


def resume_copy(run, destination, step):
  """A copy of `run` as it was right after the checkpoint of `step` (later checkpoints and metrics removed)."""
  shutil.copytree(run, destination)
  for name in os.listdir(destination / "checkpoints"):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(destination / "checkpoints" / name)
  os.remove(destination / "metrics.jsonl")
  return destination


def test_sigterm_right_after_a_save_of_a_resumed_run_stops_both_at_once(setup, two_host_run):
  """Orbax's save passes the training step to JAX's preemption sync point too, on every host (and process 0's
  finalize thread when the save ends). If the notice's protocol read that instead of the Trainer's count of this
  launch's steps, a resumed run's sync point would land beyond its end: the stop never came (the run trained on to
  step 24)."""
  root, config, _ = setup
  run = resume_copy(two_host_run[0], root / "resumed_then_stopped", step=8)
  stops = final_steps(run_hosts(config, run, signal_at=16))  # a save step
  assert len(stops) == 2 and stops[0] == stops[1] and 16 < stops[0] <= 19, stops
  log = read_jsonl(run / "events.jsonl")
  assert [e["step"] for e in log if e["event"] == "stopped"][-1] == stops[0]


def test_two_host_checkpoint_restores_onto_one_host_with_8_and_2_devices(setup, two_host_run):
  root, config, reference = setup
  workdir = two_host_run[0]
  one_by_eight = resume_copy(workdir, root / "resume_1x8", step=8)
  Trainer(config, str(one_by_eight)).run()
  one_by_two = resume_copy(workdir, root / "resume_1x2", step=8)
  run_hosts(config, one_by_two, processes=1, devices=2)
  for run in (one_by_eight, one_by_two):
    losses = losses_by_step(run)
    assert min(losses) == 12, sorted(losses)
    assert_losses_match(losses, reference, [s for s in LOGGED if s > 8])
    restored = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "checkpoint_restored"]
    assert restored[-1]["step"] == 8


def test_a_sigterm_after_the_last_step_does_not_hold_the_exit(setup):
  """TPU maintenance can signal one host just after another has finished and begun to exit. JAX's preemption notifier
  would then wait 3 minutes at its barrier for the host that left; after the last step the signal is only reported."""
  root, config, _ = setup
  config = make_config(config.data.train_shards, root / "cache_late")
  config.train.steps = 4
  started = time.time()
  # Under the barrier's 3 minutes with room for a loaded machine (at 90 s it timed out in a CI run of twice the usual
  # length).
  outputs = finish(start_hosts(config, root / "late_sigterm", signal_at=-2), timeout=150)
  assert final_steps(outputs) == [4, 4] and time.time() - started < 150
  assert "SIGTERM after the last step" in outputs[1]


def test_malformed_shards_on_one_host_do_not_hang_the_other(setup):
  root, config, _ = setup
  directory = root / "mixed_shards"
  write_synthetic_shards(directory, num_shards=NUM_SHARDS, per_shard=PER_SHARD)
  shards = list_shards(str(directory / "train-*.tar"))
  # Stream 1 (process 1) gets half malformed shards in the first epoch; stream 0 reads clean ones.
  stream_one = stream_shards(shards, config.seed, epoch=0, stream=1, streams=2)
  for path in stream_one[: len(stream_one) // 2 + 1]:
    write_malformed_shard(path)
  config = make_config(str(directory / "train-*.tar"), root / "cache_mixed")
  config.train.steps = 50  # several epochs of each stream
  finish(start_hosts(config, root / "mixed"), timeout=2 * TIMEOUT_S)
  assert max(losses_by_step(root / "mixed")) == 50
  skipped = [e for e in read_jsonl(root / "mixed" / "events.jsonl") if e["event"] == "skipped_sample"]
  assert any(e["process"] == 1 for e in skipped)


def test_hosts_holding_the_same_rows_are_realigned_after_a_shard_only_one_could_read(tmp_path):
  """A mesh.tensor across hosts puts the same rows on both, each reading the streams itself: a shard that one could
  not download and the other could put their streams at different places, and from then on the same rows held
  different samples on each host, for the rest of the run, unnoticed (found by review). At the next log step the
  streams move on to the furthest position, and the rows agree from the step after it."""
  shards = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=NUM_SHARDS, per_shard=PER_SHARD))
  config = make_config(str(tmp_path / "shards" / "train-*.tar"), tmp_path / "cache")
  config.mesh.update(data=1, fsdp=1, tensor=-1)  # 1 device per host: the tensor axis spans the 2 hosts
  config.train.update(steps=12, ckpt_every=12)
  victim = stream_shards(shards, config.seed, epoch=0, stream=0, streams=2)[1]  # read in steps 2-3 (4 rows a step)
  outputs = run_hosts(config, tmp_path / "run", devices=1, texts=tmp_path / "texts",
                      unreadable_once=os.path.basename(victim))
  assert final_steps(outputs) == [12, 12]
  texts = [read_jsonl(f"{tmp_path / 'texts'}.{process}") for process in range(2)]
  differ = [step for step, (a, b) in enumerate(zip(*texts, strict=True), start=1) if a != b]
  assert differ and min(differ) >= 2 and max(differ) <= LOG_EVERY, differ
  realigned = [e for e in read_jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "data_realigned"]
  assert [(e["step"], e["process"], e["stream"]) for e in realigned] == [(LOG_EVERY, 0, 0)]
  assert realigned[0]["read_to"] < realigned[0]["moved_to"]


def test_a_listing_that_fails_on_process_0_fails_every_host_with_its_error(setup):
  """Process 0 lists the shards for all: when it cannot, every host must fail with its reason, not wait for it in
  the collective until a timeout (or, on a pod, a heartbeat) ends them with an unrelated error."""
  root, _, _ = setup
  config = make_config(str(root / "typo-*.tar"), root / "cache_typo")
  outputs = failed(start_hosts(config, root / "typo"))
  assert "typo-*.tar" in outputs[0] and "matches no file" in outputs[0], outputs[0][-3000:]
  assert "process 0 could not list the shards" in outputs[1] and "matches no file" in outputs[1], outputs[1][-3000:]


def test_only_process_0_reads_the_held_out_examples_and_the_parameters_are_gathered_one_array_at_a_time(tmp_path):
  """Every host read the samples' held-out examples at its launch, on a pod 8 times the listings (which the Hub
  rate-limits) and downloads, for samples that only process 0 generates; and the gather of the parameters took the
  whole tree at once. Here process 1 lists and reads nothing for them, both gather the same arrays one per call, and
  process 0 writes the samples (mel codec: no weights, 128-d latents)."""
  shards = write_synthetic_shards(tmp_path / "shards", num_shards=2, per_shard=4, latent_dim=128)
  config = make_config(shards, tmp_path / "cache")
  config.model.latent_dim = 128
  config.data.eval_shards = write_synthetic_shards(tmp_path / "shards", num_shards=1, latent_dim=128, seed=1,
                                                   prefix="eval")
  config.codec = "mel"
  config.samples.update(every=2, count=2, steps=2)
  config.train.update(steps=2, ckpt_every=2)
  run_hosts(config, tmp_path / "run", sample_calls=tmp_path / "calls")
  calls = [json.loads((tmp_path / f"calls.{process}").read_text()) for process in range(2)]
  for_examples = [[call for call in process_calls if call[0] != "gather"] for process_calls in calls]
  assert for_examples == [[["list_shards", config.data.eval_shards], ["iter_shard", "eval-00000.tar"]], []]
  gathers = [[call[1] for call in process_calls if call[0] == "gather" and call[1] is not None]
             for process_calls in calls]
  assert gathers[0] == gathers[1] and len(gathers[0]) > 1 and set(gathers[0]) == {1}, gathers
  assert sorted(os.listdir(tmp_path / "run" / "samples" / "step_2")) == [
      "0.png", "0.txt", "0.wav", "1.png", "1.txt", "1.wav"]
  log = read_jsonl(tmp_path / "run" / "events.jsonl")
  assert [(e["event"], e["step"]) for e in log if e["event"].startswith("sample")] == [("samples_written", 2)]


def test_a_workdir_the_hosts_do_not_all_share_is_refused_before_training(setup):
  """A local workdir on a pod: each host would save its part of every checkpoint where no other reads it (before
  this check, 2 hosts with a directory each hung at their first checkpoint until killed). Here hosts 0 and 1 share a
  directory and host 2 has its own: every host refuses it before its first step."""
  root, config, _ = setup
  config = copy.deepcopy(config)
  config.train.batch_size, config.data.streams = 6, 3
  shared, own = root / "unshared" / "hosts_0_1", root / "unshared" / "host_2"
  outputs = failed(start_hosts(config, json.dumps([str(shared), str(shared), str(own)]), processes=3, devices=2))
  for output, workdir in zip(outputs, (shared, shared, own), strict=True):
    assert f"the workdir {workdir} is not one storage every host shares: process 1 does not see it, the file that " \
           "process 2 wrote there (2 of 3 processes miss their neighbour's)" in output, output[-3000:]
  assert "on a pod the workdir must be on gs://" in outputs[0]
  assert not list((root / "unshared").rglob("checkpoints/*")) and not list((root / "unshared").rglob(".storage*"))


def test_a_run_directory_a_stale_trainer_still_writes_is_refused_on_every_host(setup):
  """A relaunch while one host's trainer of the last launch still runs there (its launcher killed): the new process
  1 finds the run directory claimed, and every host refuses the launch with that reason before its compile, writing
  nothing into the holder's run log."""
  root, config, _ = setup
  workdir = root / "claimed"
  with claimed_elsewhere(workdir, 1) as holder:
    outputs = failed(start_hosts(config, workdir))
  in_use = f"the run directory {workdir} is in use: process 1 of another trainer holds it (pid {holder} on "
  assert f"RunDirectoryInUseError: {in_use}" in outputs[1], outputs[1][-3000:]
  assert f"RunDirectoryInUseError: process 1 cannot use the run directory: {in_use}" in outputs[0], outputs[0][-3000:]
  assert not (workdir / "checkpoints").exists() and not read_jsonl(workdir / "events.jsonl")
  assert not (workdir / "errors").exists()  # no error file of the refused processes beside the holder's


# One of 2 hosts × 2 devices: places a host array on a sharding over both hosts' devices, as the trainer places
# --init_from's weights, counting the collectives that device_put would make; prints its shards and that count.
PLACE = textwrap.dedent("""
    import json
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from echo_jax import sharding
    from echo_jax.train.entry import join_hosts
    from echo_jax.train.loop import place_host_arrays
    join_hosts()
    gathers = []
    real_assert_equal = multihost_utils.assert_equal
    def counting(*args, **kwargs):
      gathers.append(1)
      return real_assert_equal(*args, **kwargs)
    multihost_utils.assert_equal = counting
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    arrays = {"w": np.arange(24, dtype=np.float32).reshape(8, 3), "b": np.arange(3, dtype=np.float32)}
    where = {"w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")),
             "b": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
    placed = place_host_arrays(arrays, where)
    right = all(np.array_equal(np.asarray(shard.data), arrays[name][shard.index])
                for name in arrays for shard in placed[name].addressable_shards)
    print(json.dumps({"gathers": len(gathers), "right": right, "global": placed["w"].shape == (8, 3)}))
""")


def test_init_from_weights_are_placed_without_a_gather_per_array():
  """jax.device_put of a numpy array onto a sharding over several processes checks that every process holds the
  same value: a collective per array gathering it whole onto every device (P × its size; out of memory for a large
  model on a large slice). Before, --init_from's weights went through it: 2 gathers here."""
  port = free_port()
  hosts = []
  for index in range(2):
    env = cpu_env(2)
    env.update(ECHO_COORDINATOR=f"127.0.0.1:{port}", ECHO_NUM_PROCESSES="2", ECHO_PROCESS_ID=str(index))
    hosts.append(subprocess.Popen([sys.executable, "-c", PLACE], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  for host in hosts:
    output = host.communicate(timeout=TIMEOUT_S)[0]
    assert host.returncode == 0, output[-3000:]
    assert json.loads(output.splitlines()[-1]) == {"gathers": 0, "right": True, "global": True}, output[-3000:]
