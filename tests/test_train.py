"""Training: it learns, it is deterministic, it resumes exactly (also after SIGKILL), shards, and survives bad data."""

import copy
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

import fake_hub
import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, cpu_env, free_port, load_config, wait_for, write_synthetic_shards

from echo_jax import aot, checkpoint, metrics, sharding, storage
from echo_jax.background import InBackground
from echo_jax.config import config_changes, model_config, write_config_json
from echo_jax.data.shards import list_shards
from echo_jax.metrics import train_flops_per_step
from echo_jax.model import Echo
from echo_jax.train.loop import Trainer
from echo_jax.train.state import abstract_train_state, create_train_state, example_inputs, learning_rate_schedule
from echo_jax.train.step import StepFunctions, apply_model, sharded_abstract_state


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def losses_by_step(workdir):
  """step -> loss of the training lines; a later line for the same step (after a resume) wins."""
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


def eval_losses_by_step(workdir):
  """step -> held-out loss of the evaluation lines."""
  return {r["step"]: r["eval_loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval_loss" in r}


def events(workdir):
  return read_jsonl(os.path.join(workdir, "events.jsonl"))


def test_tiny_overfits_eight_samples(tmp_path):
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards", num_shards=1, per_shard=8)
  # No condition dropout: with the text always present the velocity is fully determined, so the loss can go to 0.
  config.train.update(steps=400, lr=1e-2, warmup_frac=0.02, weight_decay=0.0, text_dropout=0.0, speaker_dropout=0.0,
                      ckpt_every=1000, eval_every=0)
  Trainer(config, str(tmp_path / "run")).run()
  losses = losses_by_step(tmp_path / "run")
  first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in range(391, 401)])
  assert last < 0.1 * first, (first, last)


def test_same_seed_same_losses_and_one_compilation(tmp_path, caplog):
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards")
  config.train.update(steps=20, ckpt_every=1000, eval_every=0)
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING, logger="jax"):
      Trainer(config, str(tmp_path / "a")).run()
  finally:
    jax.config.update("jax_log_compiles", False)
  compiles = [r for r in caplog.records if "train_step" in r.getMessage() and "Compiling" in r.getMessage()]
  assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]
  Trainer(config, str(tmp_path / "b")).run()
  a, b = losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")
  assert sorted(a) == list(range(1, 21))
  assert a == b  # bitwise: the floats were written with full precision
  config.seed = 1
  Trainer(config, str(tmp_path / "c")).run()
  assert losses_by_step(tmp_path / "c") != a


class StallingPipeline:
  """The training pipeline, except that fetching batch `at` takes `seconds` longer (a slow shard download)."""

  def __init__(self, pipeline, at: int, seconds: float):
    self.pipeline, self.at, self.seconds, self.fetched = pipeline, at, seconds, 0

  def __next__(self):
    self.fetched += 1
    if self.fetched == self.at:
      time.sleep(self.seconds)
    return next(self.pipeline)

  def __getattr__(self, name):
    return getattr(self.pipeline, name)


def test_each_step_is_timed_to_its_end_the_first_one_too(tiny_config, tmp_path, monkeypatch):
  """A step's time runs from the end of the step before it (for a launch's first step: from the start of the loop) to
  its own end, seen when its metrics are fetched, and its data wait is the waiting within that time. Timed between
  two dispatches instead, the first step of every launch measured only its own dispatch (the demo logged an MFU of
  1380% there); and the wait for batch N+1, which comes before step N is seen to finish, was counted in step N+1."""
  tiny_config.train.update(steps=12, batch_size=64, ckpt_every=1000, eval_every=0)
  pipeline = Trainer._pipeline
  monkeypatch.setattr(Trainer, "_pipeline", lambda self, *args, **kwargs: StallingPipeline(
      pipeline(self, *args, **kwargs), at=7, seconds=1.0))
  Trainer(tiny_config, str(tmp_path / "run")).run()
  lines = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
  times = [r["step_time"] for r in lines]
  assert [r["step"] for r in lines] == list(range(1, 13))
  assert all(0 < r["mfu"] < 1 and 0 <= r["data_wait"] <= 1 for r in lines), [(r["mfu"], r["data_wait"]) for r in lines]
  assert times[0] >= 0.5 * np.median(times[1:]), times
  # Batch 7 is fetched after step 6 is dispatched and before step 6 is seen to finish: the stall is step 6's.
  assert times[5] >= 1.0 and lines[5]["data_wait"] > 0.5, lines[5]
  # The times add up to the loop's wall clock, from the start event to the last step's metrics line, less the few
  # statements between those marks and the loop's own (never more: they lie outside it).
  start = next(e["time"] for e in events(tmp_path / "run") if e["event"] == "start")
  assert 0 <= (lines[-1]["time"] - start) - sum(times) < 0.5 * np.median(times), (sum(times), lines[-1]["time"] - start)


KILLING_RUN = textwrap.dedent("""
    import os, signal, sys, time, json
    import ml_collections
    from echo_jax.train.loop import Trainer

    config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
    workdir, kill_at, wait_for = sys.argv[2], int(sys.argv[3]), sys.argv[4]

    def kill(info):
      if info.step == kill_at:
        # Kill while the loop runs: after the wanted checkpoint committed (or, with wait_for '-', at once).
        while wait_for != "-" and not os.path.exists(os.path.join(workdir, "checkpoints", wait_for,
                                                                  "commit_success.txt")):
          time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)

    Trainer(config, workdir, hooks=((1, kill),)).run()
""")


def run_killed(config, workdir, kill_at, wait_for):
  process = subprocess.run([sys.executable, "-c", KILLING_RUN, config.to_json(), str(workdir), str(kill_at),
                            wait_for], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]


def final_params(workdir):
  _, params = checkpoint.load_params(str(workdir))
  return jax.tree.map(np.asarray, params)


def test_resume_after_sigkill_is_exact(tmp_path, monkeypatch):
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards", num_shards=3, per_shard=5)
  config.data.eval_shards = write_synthetic_shards(tmp_path / "shards", num_shards=1, seed=1, prefix="eval")
  config.train.update(steps=30, ckpt_every=15, eval_every=5, log_every=1)
  # How many steps each Trainer had logged when it read its held-out batches.
  logged_at_read, log_step, eval_batches = [], Trainer._log_step, Trainer._eval_batches

  def counting_log_step(self, *args, **kwargs):
    self.steps_logged = getattr(self, "steps_logged", 0) + 1
    return log_step(self, *args, **kwargs)

  def recording_eval_batches(self, pipeline):
    logged_at_read.append(getattr(self, "steps_logged", 0))
    return eval_batches(self, pipeline)

  monkeypatch.setattr(Trainer, "_log_step", counting_log_step)
  monkeypatch.setattr(Trainer, "_eval_batches", recording_eval_batches)
  Trainer(config, str(tmp_path / "straight")).run()

  resumed = tmp_path / "resumed"
  run_killed(config, resumed, kill_at=18, wait_for="15")
  assert not os.path.exists(resumed / "checkpoints" / "30")

  def no_measurement(*args, **kwargs):
    raise AssertionError("a resumed CPU run measured the matmul peak again")

  monkeypatch.setattr(metrics, "measure_matmul_peak", no_measurement)
  restore, restore_seconds = checkpoint.Checkpointer.restore, []

  def timed_restore(self, *args, **kwargs):
    started = time.perf_counter()
    try:
      return restore(self, *args, **kwargs)
    finally:
      restore_seconds.append(time.perf_counter() - started)

  monkeypatch.setattr(checkpoint.Checkpointer, "restore", timed_restore)
  # A restore bound below every array: the trainer must raise it to twice the largest one (Orbax fails an array that
  # does not fit) and hand that to its Checkpointer.
  config.train.ckpt_restore_gb = 1e-9
  init, restore_bounds = checkpoint.Checkpointer.__init__, []

  def recording_init(self, *args, restore_gb=None, **kwargs):
    restore_bounds.append(restore_gb)
    init(self, *args, restore_gb=restore_gb, **kwargs)

  monkeypatch.setattr(checkpoint.Checkpointer, "__init__", recording_init)
  Trainer(config, str(resumed)).run()
  # It took the killed run's measured peak from the checkpoint: a faster restart, and MFU against the same peak.
  first_start, restart = [e for e in events(resumed) if e["event"] == "start"]
  assert restart["step"] == 15 and restart["peak_flops"] == first_start["peak_flops"] > 0

  straight_losses, resumed_losses = losses_by_step(tmp_path / "straight"), losses_by_step(resumed)
  assert [resumed_losses[s] for s in range(16, 31)] == [straight_losses[s] for s in range(16, 31)]
  # A new run reads its held-out batches before its first step (it evaluates there); the restart reads them, and
  # compiles its eval step, once its first step is logged (StepFunctions.compile_eval_in_background). The
  # evaluations it then makes are the uninterrupted run's.
  assert logged_at_read[0] == 0 and len(logged_at_read) == 2 and logged_at_read[1] >= 1
  straight_evals, resumed_evals = eval_losses_by_step(tmp_path / "straight"), eval_losses_by_step(resumed)
  assert sorted(straight_evals) == [0, 5, 10, 15, 20, 25, 30]
  assert {s: resumed_evals[s] for s in (20, 25, 30)} == {s: straight_evals[s] for s in (20, 25, 30)}
  restored = [e for e in events(resumed) if e["event"] == "checkpoint_restored"]
  assert [e["step"] for e in restored] == [15] and len(restore_seconds) == 1
  assert restored[0]["seconds"] == pytest.approx(restore_seconds[0], abs=0.01)  # the restore's own duration
  resumed_params = jax.tree.leaves(final_params(resumed))
  assert restore_bounds == [2 * max(leaf.nbytes for leaf in resumed_params) / 1e9]
  for a, b in zip(jax.tree.leaves(final_params(tmp_path / "straight")), resumed_params, strict=True):
    np.testing.assert_array_equal(a, b)


def test_restart_restores_the_state_while_the_train_step_compiles_or_after_it(tmp_path, monkeypatch):
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards", num_shards=2, per_shard=5)
  config.train.update(steps=4, ckpt_every=2, log_every=1)
  Trainer(config, str(tmp_path / "run")).run()

  # The restore and the compilation each wait here for the other to begin: run one after the other, on any thread
  # and in either order, the first to arrive waits in vain and the barrier breaks.
  both_running = threading.Barrier(2, timeout=60)
  restore, compile_steps = checkpoint.Checkpointer.restore, StepFunctions.compile.__func__

  def restore_once_compiling(self, *args, **kwargs):
    both_running.wait()
    return restore(self, *args, **kwargs)

  def compile_once_restoring(cls, *args, **kwargs):
    both_running.wait()
    return compile_steps(cls, *args, **kwargs)

  shutil.copytree(tmp_path / "run", tmp_path / "run_copy")
  monkeypatch.setattr(checkpoint.Checkpointer, "restore", restore_once_compiling)
  monkeypatch.setattr(StepFunctions, "compile", classmethod(compile_once_restoring))
  config.train.steps = 6
  Trainer(config, str(tmp_path / "run")).run()
  assert sorted(losses_by_step(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
  assert any(e["event"] == "checkpoint_restored" and e["step"] == 4 for e in events(tmp_path / "run"))

  # train.restore_beside_compile=False: the restore begins once the compile (or load) has ended, and the run goes on
  # as the overlapped one did.
  order = []

  def restore_recorded(self, *args, **kwargs):
    order.append("restore begins")
    return restore(self, *args, **kwargs)

  def compile_recorded(cls, *args, **kwargs):
    order.append("compile begins")
    try:
      return compile_steps(cls, *args, **kwargs)
    finally:
      order.append("compile ends")

  monkeypatch.setattr(checkpoint.Checkpointer, "restore", restore_recorded)
  monkeypatch.setattr(StepFunctions, "compile", classmethod(compile_recorded))
  config.train.restore_beside_compile = False
  Trainer(config, str(tmp_path / "run_copy")).run()
  assert order == ["compile begins", "compile ends", "restore begins"]
  overlapped, after = losses_by_step(tmp_path / "run"), losses_by_step(tmp_path / "run_copy")
  assert [after[step] for step in (5, 6)] == [overlapped[step] for step in (5, 6)]


def test_sigkill_during_async_save_resumes_from_previous_checkpoint(tmp_path):
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards")
  config.train.update(steps=40, ckpt_every=10, eval_every=0)
  workdir = tmp_path / "run"
  run_killed(config, workdir, kill_at=20, wait_for="-")  # the save of step 20 has just started
  names = os.listdir(workdir / "checkpoints")
  assert "10" in names and "20" not in names, names
  assert any(".orbax-checkpoint-tmp" in n for n in names), names  # the interrupted save is on disk
  Trainer(config, str(workdir)).run()
  log = events(workdir)
  assert any(e["event"] == "incomplete_checkpoint_ignored" for e in log)
  restored = [e for e in log if e["event"] == "checkpoint_restored"]
  assert restored and restored[0]["step"] == 10
  assert checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=3).latest_step() == 40


def compile_steps(config, devices):
  model = Echo(model_config(config))
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  return model, StepFunctions.compile(model, config, mesh, example_inputs(config, config.train.batch_size))


def test_every_large_weight_is_fsdp_sharded_on_8_devices():
  config = load_config("echo_1p3b")
  model = Echo(model_config(config))
  abstract, specs = abstract_train_state(model, config)
  assert abstract == jax.eval_shape(lambda: create_train_state(model, jax.random.key(0), config))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  shardings = sharding.logical_to_shardings(specs, abstract, mesh)
  large = 0
  for (path, leaf), leaf_sharding in zip(jax.tree_util.tree_leaves_with_path(abstract),
                                         jax.tree.leaves(shardings), strict=True):
    if leaf.size * leaf.dtype.itemsize > 2**20:
      large += 1
      assert "fsdp" in jax.tree.leaves(tuple(leaf_sharding.spec)), jax.tree_util.keystr(path)
  assert large > 50


def test_eval_step_compiled_in_the_background_equals_the_one_compiled_at_once(tiny_config):
  model = Echo(model_config(tiny_config))
  mesh = sharding.make_mesh(tiny_config.mesh.to_dict(), jax.devices()[:1])
  shapes = example_inputs(tiny_config, tiny_config.train.batch_size)
  later = StepFunctions.compile(model, tiny_config, mesh, shapes, evaluate=False)
  assert later.eval is None
  lowered_on, lower_eval = [], later.lower_eval
  later.lower_eval = lambda: lowered_on.append(threading.current_thread()) or lower_eval()
  later.compile_eval_in_background()
  background = later.eval_step()
  assert later.eval is background and later.eval_step() is background
  assert len(lowered_on) == 1 and lowered_on[0] is not threading.main_thread()  # compiled once, in the background
  at_once = StepFunctions.compile(model, tiny_config, mesh, shapes).eval
  state = jax.jit(lambda key: create_train_state(model, key, tiny_config))(jax.random.key(0))
  batch = {name: jnp.ones(s.shape, s.dtype) for name, s in shapes.items()}
  assert jax.device_get(background(state.params, batch, jax.random.key(1))) == jax.device_get(
      at_once(state.params, batch, jax.random.key(1)))


def test_activation_constraints_are_in_the_traced_step():
  """Under `sharding.activate` every `nn.with_logical_constraint` of the model reaches the program; without a mesh
  set through `jax.set_mesh` (e.g. under the legacy `with mesh:`) Flax drops them silently."""
  config = load_config("tiny")
  model = Echo(model_config(config))
  abstract, _ = abstract_train_state(model, config)
  shapes = example_inputs(config, 8)
  t = jax.ShapeDtypeStruct((8,), jnp.float32)
  lower = lambda: jax.jit(functools.partial(apply_model, model)).lower(  # noqa: E731
      abstract.params, shapes["latent"], t, shapes).as_text()
  with sharding.activate(sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})):
    constrained = lower()
  assert constrained.count("sharding_constraint") >= 3, constrained.count("sharding_constraint")
  assert lower().count("sharding_constraint") == 0


def test_eight_device_step_matches_one_device_step(tiny_config):
  batch_size = tiny_config.train.batch_size
  rng = np.random.default_rng(0)
  batch = {name: rng.standard_normal(s.shape).astype(s.dtype) if s.dtype != np.bool_
           else rng.uniform(size=s.shape) < 0.8
           for name, s in example_inputs(tiny_config, batch_size).items()}
  batch["text"] = rng.integers(0, 256, batch["text"].shape).astype(np.int32)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    model, steps = compile_steps(tiny_config, devices)
    init = jax.jit(functools.partial(create_train_state, model, config=tiny_config),
                   out_shardings=steps.state_shardings)
    state = init(jax.random.key(0))
    for _ in range(3):
      state, out = steps.train(state, sharding.global_batch(batch, steps.mesh))
    results.append((float(out["loss"]), jax.tree.map(np.asarray, state.params)))
  (loss_1, params_1), (loss_8, params_8) = results
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


def test_analytic_flops_match_xla_count(tiny_config):
  # XLA counts a scanned loop body once, so compare on one layer per stack, where that count is exact; batch 8
  # keeps the optimizer update (which XLA counts and model FLOPs do not) a few percent of the step.
  tiny_config.train.batch_size = 8
  # Wide enough that matmuls dominate the elementwise work (norms, softmax, AdamW) that XLA also counts.
  tiny_config.model.update(dim=512, mlp_dim=1536, text_dim=512, speaker_dim=512, text_mlp_dim=1536,
                           speaker_mlp_dim=1536, layers=1, text_layers=1, speaker_layers=1)
  model, steps = compile_steps(tiny_config, jax.devices()[:1])
  data = tiny_config.data
  analytic = train_flops_per_step(model.cfg, 8, data.max_frames, data.max_text_len, data.max_ref_frames)
  assert 0.85 < steps.train_flops / analytic < 1.2, (steps.train_flops, analytic)


def write_malformed_shard(path: pathlib.Path, latent_dim=8):
  """One good sample and one of each malformed kind."""
  import io

  def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()

  good_latent = np.ones((10, latent_dim), np.float16)
  ref = np.ones((8, latent_dim), np.float16)
  members = [
      ("good.npy", npy(good_latent)), ("good.ref.npy", npy(ref)), ("good.json", b'{"text": "fine"}'),
      ("noref.npy", npy(good_latent)), ("noref.json", b'{"text": "x"}'),
      ("nojson.npy", npy(good_latent)), ("nojson.ref.npy", npy(ref)),
      ("shape.npy", npy(np.ones((10, latent_dim + 1), np.float16))), ("shape.ref.npy", npy(ref)),
      ("shape.json", b'{"text": "x"}'),
      ("dtype.npy", npy(np.ones((10, latent_dim), np.float32))), ("dtype.ref.npy", npy(ref)),
      ("dtype.json", b'{"text": "x"}'),
      ("nan.npy", npy(np.full((10, latent_dim), np.nan, np.float16))), ("nan.ref.npy", npy(ref)),
      ("nan.json", b'{"text": "x"}'),
      ("empty.npy", npy(good_latent)), ("empty.ref.npy", npy(ref)), ("empty.json", b'{"text": ""}'),
      ("utf.npy", npy(good_latent)), ("utf.ref.npy", npy(ref)), ("utf.json", b'{"text": "\xff\xfe"}'),
      ("long.npy", npy(np.ones((1000, latent_dim), np.float16))), ("long.ref.npy", npy(ref)),
      ("long.json", b'{"text": "x"}'),
      ("a.b.npy", npy(good_latent)), ("a.b.ref.npy", npy(ref)), ("a.b.json", b'{"text": "x"}'),
      ("trunc.npy", npy(good_latent)[:40]), ("trunc.ref.npy", npy(ref)), ("trunc.json", b'{"text": "x"}'),
  ]
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_malformed_data_is_skipped_counted_and_training_goes_on(tmp_path):
  config = load_config("tiny")
  write_synthetic_shards(tmp_path / "shards", num_shards=1)
  write_malformed_shard(tmp_path / "shards" / "train-bad.tar")
  config.data.train_shards = str(tmp_path / "shards" / "train-*.tar")
  config.train.update(steps=12, ckpt_every=1000, eval_every=0, log_every=4)
  Trainer(config, str(tmp_path / "run")).run()
  skipped = [e for e in events(tmp_path / "run") if e["event"] == "skipped_sample"]
  keys = {e["key"] for e in skipped}
  assert {"noref", "nojson", "shape", "dtype", "nan", "empty", "utf", "long", "trunc"} <= keys, keys
  assert any("a.b" in e["key"] or e["reason"] == "bad_key" for e in skipped)
  assert {(e["data"], e["shard"]) for e in skipped} == {("train", str(tmp_path / "shards" / "train-bad.tar"))}
  assert max(losses_by_step(tmp_path / "run")) == 12


def test_pickle_export_import_round_trip(tmp_path):
  config = load_config("tiny")
  model = Echo(model_config(config))
  state = create_train_state(model, jax.random.key(0), config)
  state = state.replace(step=jnp.asarray(7, jnp.int32))
  checkpoint.export_pickle(state, samples_seen=56, path=str(tmp_path / "ckpt.pkl"))
  restored, samples_seen = checkpoint.import_pickle(str(tmp_path / "ckpt.pkl"), state)
  assert samples_seen == 56 and int(restored.step) == 7
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves(
      (restored.params, restored.opt_state)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = load_config("tiny")
  other.model.dim = 32
  with pytest.raises(ValueError, match="shape"):
    checkpoint.import_pickle(str(tmp_path / "ckpt.pkl"),
                             create_train_state(Echo(model_config(other)), jax.random.key(0), other))


def test_no_tensorflow_or_torch_at_import(tmp_path):
  """Stand-ins for torch and tensorflow are importable (CI installs neither): a library that imports them whenever
  they are installed (webdataset does, for torch) loads them here as it would on a GPU host or a TPU VM."""
  for name in ("torch", "tensorflow"):
    (tmp_path / name / "utils").mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text("class Tensor:\n  pass\n")
    (tmp_path / name / "utils" / "__init__.py").write_text("")
    (tmp_path / name / "utils" / "data.py").write_text("class DataLoader:\n  pass\nclass IterableDataset:\n  pass\n")
  code = textwrap.dedent("""
      import importlib, pkgutil, runpy, sys
      import torch, tensorflow  # the stand-ins are found
      for name in [m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow")]:
        del sys.modules[name]
      import echo_jax
      for module in pkgutil.walk_packages(echo_jax.__path__, "echo_jax."):
        importlib.import_module(module.name)
      for script in ("train_pretrain", "monitor", "disk_watchdog", "inference"):
        try:
          importlib.import_module(script)
        except ModuleNotFoundError as error:
          if error.name != script:
            raise
      bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow"))
      assert not bad, bad
  """)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
  assert result.returncode == 0, result.stderr[-3000:]


def test_relative_workdir(tmp_path, monkeypatch):
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards")
  config.train.update(steps=4, ckpt_every=2, eval_every=0)
  monkeypatch.chdir(tmp_path)
  Trainer(config, "runs/relative").run()
  assert checkpoint.Checkpointer("runs/relative/checkpoints", keep=3).all_steps() == [2, 4]
  assert checkpoint.load_params("runs/relative")[0].train.steps == 4


def test_a_workdir_starting_with_a_tilde_is_in_the_home_directory(tmp_path, monkeypatch):
  """A shell leaves `--workdir=~/runs/x` as it is: half the run's files went to a directory named `~` in the current
  one, and the run failed blaming the credentials (found by review)."""
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards")
  config.train.update(steps=2, ckpt_every=2, eval_every=0)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  Trainer(config, "~/runs/x").run()
  assert checkpoint.Checkpointer(str(tmp_path / "home" / "runs" / "x" / "checkpoints"), keep=3).all_steps() == [2]
  assert not (tmp_path / "~").exists()


def test_a_workdir_that_is_a_file_is_refused_naming_it(tiny_config, tmp_path):
  (tmp_path / "run").write_text("notes")
  with pytest.raises(storage.RunDirectoryError, match=f"the run directory {tmp_path / 'run'} is a file"):
    Trainer(tiny_config, str(tmp_path / "run"))
  assert (tmp_path / "run").read_text() == "notes"


@pytest.mark.parametrize("setting, error, match", [
    ({"train_shards": "typo-*.tar"}, FileNotFoundError, "typo"),
    ({"eval_shards": "typo-*.tar"}, FileNotFoundError, "typo"),
    ({"streams": 4}, ValueError, r"2 shards cannot give each of data.streams=4 streams a shard"),
    ({"pad_latent": "missing.npy"}, FileNotFoundError, "missing.npy"),
    ({"train_shards": "memory://echo-no-cache/*.tar"}, ValueError, r"remote shards \(memory://.*need a shard cache"),
])
def test_data_a_launch_cannot_read_fails_it_before_the_compile(tiny_config, tmp_path, monkeypatch, setting, error,
                                                               match):
  """Minutes of a pod's compile are not spent on a launch that cannot read its data. Too many streams, a missing pad
  latent and remote shards without a cache failed only once the step had compiled (found by review)."""
  fsspec.filesystem("memory").pipe("/echo-no-cache/a.tar", b"")
  for field, value in setting.items():
    tiny_config.data[field] = str(tmp_path / value) if field != "streams" and "://" not in value else value
  tiny_config.data.cache_dir = ""
  compiled = []
  monkeypatch.setattr(StepFunctions, "compile", lambda *args, **kwargs: compiled.append(True))
  with pytest.raises(error, match=match):
    Trainer(tiny_config, str(tmp_path / "run")).run()
  assert not compiled


SLOW_ORBAX_CLEANUP_ENTRY = """
import asyncio, runpy, sys
from orbax.checkpoint._src.path import temporary_paths
cleanup = temporary_paths.cleanup_temporary_paths

async def slow_cleanup(*args, **kwargs):  # as on a slow disk or gs://: the launch can fail before the clean-up ends
  await asyncio.sleep(1.0)
  return await cleanup(*args, **kwargs)

temporary_paths.cleanup_temporary_paths = slow_cleanup
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("failure", ["shard spec naming nothing", "damaged checkpoint"])
def test_a_launch_that_fails_at_its_start_ends_with_its_own_error(tmp_path, failure):
  """The real entry, failing before its first step, before the checkpoint manager opens (a shard spec naming nothing)
  or moments after (its checkpoint's metadata is missing): the error that stopped it is the last thing printed, not a
  traceback from the clean-up thread of the Orbax checkpoint manager cut short by the exit (slowed down here, so that
  the test does not depend on a race)."""
  shards = str(tmp_path / "typo-*.tar")
  if failure == "damaged checkpoint":
    shards = write_synthetic_shards(tmp_path / "shards")
    (tmp_path / "run" / "checkpoints" / "2" / "state").mkdir(parents=True)
  result = subprocess.run(
      [sys.executable, "-c", SLOW_ORBAX_CLEANUP_ENTRY, "train_pretrain.py", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'run'}", f"--config.data.train_shards={shards}", "--config.samples.every=0"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "after interpreter shutdown" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  if failure == "damaged checkpoint":
    assert last.startswith("echo_jax.checkpoint.CheckpointRestoreError: restoring checkpoint step 2") and \
        "2 has no data, meta" in last, result.stderr[-3000:]
  else:
    assert last.startswith("FileNotFoundError: shard spec item"), result.stderr[-3000:]


def test_the_error_that_stops_a_process_is_written_to_a_file_of_its_own(tiny_config, tmp_path, monkeypatch):
  """Only process 0 writes events.jsonl, so the error of any other process reached no file of the run (found by
  review). Each process writes its own to errors/process_<I>.json; a write that fails leaves the error raised as it
  was."""
  tiny_config.data.train_shards = str(tmp_path / "typo-*.tar")
  with pytest.raises(FileNotFoundError, match="shard spec item"):
    Trainer(tiny_config, str(tmp_path / "run")).run()
  record = json.loads((tmp_path / "run" / "errors" / "process_0.json").read_text())
  assert record["message"].startswith("FileNotFoundError: shard spec item") and record["step"] is None
  assert (record["process"], record["host"], record["pid"]) == (0, socket.gethostname(), os.getpid())
  assert time.time() - 60 < record["time"] <= time.time()

  def unwritable(path, data):
    raise PermissionError(f"403 {path}")

  monkeypatch.setattr(metrics.storage, "write_bytes", unwritable)
  with pytest.raises(FileNotFoundError, match="shard spec item"):
    Trainer(tiny_config, str(tmp_path / "run2")).run()


def test_remote_shards_stream_through_a_cache_of_the_run_and_role(tiny_config, tmp_path):
  """Training and held-out shards from an fsspec filesystem (memory://, standing in for gs:// and hf://), the same
  shards in both roles: each role has its own cache directory of this run, so neither adopts or deletes the other's
  files, and every fetched shard is deleted once read."""
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=2))
  for path in local:
    with open(path, "rb") as source, fsspec.open(f"memory://echo-train-test/{os.path.basename(path)}", "wb") as out:
      out.write(source.read())
  tiny_config.data.train_shards = tiny_config.data.eval_shards = "memory://echo-train-test/*.tar"
  tiny_config.data.cache_dir = str(tmp_path / "cache")
  tiny_config.train.update(steps=6, eval_every=3, eval_batches=1, ckpt_every=1000, log_every=1)
  Trainer(tiny_config, str(tmp_path / "run")).run()
  assert max(losses_by_step(tmp_path / "run")) == 6 and sorted(eval_losses_by_step(tmp_path / "run")) == [0, 3, 6]
  assert not [e for e in events(tmp_path / "run") if e["event"] == "skipped_sample"]
  run = hashlib.sha256(str(tmp_path / "run").encode("utf-8")).hexdigest()[:12]
  assert sorted(os.listdir(tmp_path / "cache")) == [f"eval-{run}-process_0", f"train-{run}-process_0"]
  leftovers = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path / "cache") for name in names]
  assert not leftovers


def test_hf_shards_train_as_local_ones_and_the_token_is_written_nowhere(tiny_config, tmp_path, monkeypatch, capfd):
  """Training and held-out shards from a Hugging Face dataset (hf://, through huggingface_hub to the Hub stand-in,
  tests/fake_hub.py) give the losses of the same shards read locally; the token (HF_TOKEN) goes with every request
  to the Hub and into no file of the run and no line of output."""
  token = "hf_TestTokenThatMustNeverBeWritten"
  shards = list_shards(write_synthetic_shards(tmp_path / "echo", num_shards=2))
  repo = tmp_path / "hub" / "org" / "echo"
  repo.mkdir(parents=True)
  for path in shards:
    shutil.copy(path, repo)
  tiny_config.train.update(steps=4, eval_every=2, eval_batches=1, ckpt_every=2, log_every=1)
  tiny_config.data.cache_dir = str(tmp_path / "cache")
  tiny_config.data.train_shards = tiny_config.data.eval_shards = str(tmp_path / "echo" / "*.tar")
  Trainer(tiny_config, str(tmp_path / "local")).run()
  monkeypatch.setenv("HF_TOKEN", token)
  tiny_config.data.train_shards = tiny_config.data.eval_shards = "hf://datasets/org/echo/*.tar"
  with fake_hub.registered(str(tmp_path / "hub")) as hub:
    Trainer(tiny_config, str(tmp_path / "hf")).run()
  assert losses_by_step(tmp_path / "hf") == losses_by_step(tmp_path / "local")
  assert eval_losses_by_step(tmp_path / "hf") == eval_losses_by_step(tmp_path / "local")
  assert any("/resolve/" in path for path, _ in hub.requests)
  assert {authorization for _, authorization in hub.requests} == {f"Bearer {token}"}
  written = b"".join(path.read_bytes() for path in (tmp_path / "hf").rglob("*") if path.is_file())
  output = capfd.readouterr()
  assert token.encode() not in written and token not in output.out + output.err


def test_sigterm_asks_for_a_stop_and_a_second_one_ends_the_process():
  """The first SIGTERM sets the flag the loop stops at (saving a checkpoint); a second one, for a run that cannot
  reach that step, ends the process as SIGTERM does by default."""
  code = textwrap.dedent("""\
      import os, signal, threading, time
      from echo_jax.train.loop import install_sigterm_handler
      stop = threading.Event()
      install_sigterm_handler(stop)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.2)
      print("stop requested:", stop.is_set(), flush=True)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(10)
      print("still running", flush=True)
  """)
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == -signal.SIGTERM, result.stdout + result.stderr
  assert "stop requested: True" in result.stdout and "still running" not in result.stdout


# Run at the interpreter's start (as sitecustomize): the first import of echo_jax.train.entry, which the script does
# after its own first lines, says so in a file and waits, so that a test can signal the process during its imports.
_HOLD_IMPORTS = """\
import os, sys, time
class _Hold:
  def find_spec(self, name, path=None, target=None):
    if name == "echo_jax.train.entry":
      sys.meta_path.remove(self)
      open(os.environ["ECHO_TEST_IMPORTING"], "w").close()
      time.sleep(2)
sys.meta_path.insert(0, _Hold())
"""


def test_a_sigterm_during_train_pretrain_imports_stops_the_run_with_a_checkpoint(tmp_path):
  """A SIGTERM in the seconds train_pretrain.py spends importing (before the trainer's handler exists) ended the
  launch with 143, which launch.sh takes for a failure (found by review). Now it stops the run as one a moment later
  does: a checkpoint after the first step, exit 0."""
  shards = write_synthetic_shards(tmp_path / "shards", num_shards=2)
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text(_HOLD_IMPORTS)
  env = cpu_env()
  env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "site"), env.get("PYTHONPATH")])),
             ECHO_TEST_IMPORTING=str(tmp_path / "importing"))
  process = subprocess.Popen(
      [sys.executable, "train_pretrain.py", "--config=configs/tiny.py", f"--config.data.train_shards={shards}",
       "--config.data.eval_shards=", "--config.train.steps=50", "--config.train.eval_every=0",
       "--config.samples.every=0", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    wait_for(lambda: process.poll() is not None or (tmp_path / "importing").exists(), timeout=60)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
  finally:
    process.kill()
  assert process.returncode == 0, output[-4000:]
  assert max(losses_by_step(tmp_path / "run")) == 1 and (tmp_path / "run" / "checkpoints" / "1").is_dir()
  assert [e["step"] for e in events(tmp_path / "run") if e["event"] == "stopped"] == [1]


def test_the_sigterm_handler_is_refused_once_the_hosts_have_joined():
  """After jax.distributed.initialize, SIGTERM belongs to JAX's preemption notifier, which the Trainer follows in a
  joined run: a handler installed then would hide the signal from it, so that no host ever stopped."""
  code = textwrap.dedent("""\
      import threading
      import jax
      from echo_jax.train.loop import install_sigterm_handler
      jax.distributed.initialize("127.0.0.1:%d", num_processes=1, process_id=0)
      install_sigterm_handler(threading.Event())
  """)
  result = subprocess.run([sys.executable, "-c", code % free_port()], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1
  assert "RuntimeError: install_sigterm_handler must run before jax.distributed.initialize" in result.stderr


def test_a_joined_run_without_jax_preemption_service_fails_at_its_start(tiny_config, tmp_path):
  """The joined Trainer's stop is JAX's preemption sync point: with the service off (outside runtime.initialize,
  which turns it on) the run fails before anything else, with JAX's advice, not at its first step or a SIGTERM."""
  code = textwrap.dedent("""\
      import json, sys
      import jax, ml_collections
      from echo_jax.train.loop import Trainer
      jax.config.update("jax_enable_preemption_service", False)
      jax.distributed.initialize(f"127.0.0.1:{sys.argv[3]}", num_processes=1, process_id=0)
      Trainer(ml_collections.ConfigDict(json.loads(sys.argv[1])), sys.argv[2]).run()
  """)
  result = subprocess.run([sys.executable, "-c", code, tiny_config.to_json(), str(tmp_path / "run"), str(free_port())],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=cpu_env())
  assert result.returncode == 1
  assert "Make sure the 'jax_enable_preemption_service' config is enabled" in result.stderr
  assert [e["event"] for e in read_jsonl(tmp_path / "run" / "events.jsonl")] == ["error"]  # no compile, no start


def test_a_joined_single_process_run_stops_at_the_sync_point_and_refuses_a_second_run(tiny_config, tmp_path):
  """A single-host TPU VM joins the distributed runtime too (one process): there SIGTERM is JAX's preemption notice,
  and the run saves and stops at its sync point. JAX sets that point once per process, so a second run in the
  process is refused (it would stop there again, without a notice)."""
  tiny_config.train.update(steps=1000, log_every=1000, ckpt_every=1000, eval_every=0)
  code = textwrap.dedent("""\
      import json, os, signal, sys, threading
      import jax, ml_collections
      from echo_jax.train.loop import Trainer, install_sigterm_handler
      stop = threading.Event()
      install_sigterm_handler(stop)
      jax.distributed.initialize(f"127.0.0.1:{sys.argv[3]}", num_processes=1, process_id=0)
      config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
      hooks = ((1, lambda info: info.step == 3 and os.kill(os.getpid(), signal.SIGTERM)),)
      state = Trainer(config, sys.argv[2], hooks=hooks, stop_requested=stop).run()
      print(f"final_step={int(state.step)}", flush=True)
      Trainer(config, sys.argv[2], stop_requested=stop).run()
  """)
  result = subprocess.run([sys.executable, "-c", code, tiny_config.to_json(), str(tmp_path / "run"), str(free_port())],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=cpu_env())
  final = [int(line.split("=")[1]) for line in result.stdout.splitlines() if line.startswith("final_step=")]
  assert len(final) == 1 and 3 < final[0] < 1000, result.stdout + result.stderr[-3000:]
  assert (tmp_path / "run" / "checkpoints" / str(final[0])).is_dir()
  assert result.returncode == 1
  assert "RuntimeError: this process already stopped at JAX's preemption sync point" in result.stderr


def test_a_failed_background_save_stops_the_run_at_the_next_log_step(tiny_config, tmp_path, monkeypatch):
  """Orbax reports a failed asynchronous save (e.g. a full disk: RESOURCE_EXHAUSTED from its writer) only when it
  is waited for; until then the step is in its list of steps. The run must stop at the next log step with a
  `checkpoint_failed` event, not log `checkpoint_saved` and go on training ckpt_every steps to the next save."""
  tiny_config.train.update(steps=60, ckpt_every=20, log_every=1, eval_every=0)
  saves, real_save, real_wait = [], checkpoint.Checkpointer.save, checkpoint.Checkpointer.wait

  def save(self, step, *args, **kwargs):
    saves.append(step)
    real_save(self, step, *args, **kwargs)

  def wait(self):
    real_wait(self)
    if saves == [20]:
      saves.append("failed")
      raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device [os_error_code='28']")

  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  monkeypatch.setattr(checkpoint.Checkpointer, "wait", wait)
  # As Orbax's list of steps is after a failed save with keep_checkpoints=1 (the message said "step None").
  monkeypatch.setattr(checkpoint.Checkpointer, "latest_step", lambda self: None)
  with pytest.raises(checkpoint.CheckpointSaveError, match=r"step \[20\].*No space left.*The newest complete "
                                                           r"checkpoint is step 20; free space there"):
    Trainer(tiny_config, str(tmp_path / "run")).run()
  logged = events(tmp_path / "run")
  assert [e["steps"] for e in logged if e["event"] == "checkpoint_failed"] == [[20]]
  assert not [e for e in logged if e["event"] == "checkpoint_saved"]
  assert max(losses_by_step(tmp_path / "run")) < 40  # stopped once the save ended, not at the next save


def test_a_save_that_fails_while_still_running_at_the_next_save_is_reported_as_failed(tiny_config, tmp_path,
                                                                                      monkeypatch):
  """A failing save still in progress at every log step until the next save (a slow write, or a stop right after
  it): the next save waits for it first and reports it as failed, instead of Orbax's save raising the raw error."""
  tiny_config.train.update(steps=60, ckpt_every=20, log_every=1, eval_every=0)
  real_wait = checkpoint.Checkpointer.wait
  failed = []

  def wait(self):
    real_wait(self)
    if self.manager.latest_step() == 20 and not failed:
      failed.append(True)
      raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device [os_error_code='28']")

  monkeypatch.setattr(checkpoint.Checkpointer, "wait", wait)
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "is_saving_in_progress", lambda self: True)
  with pytest.raises(checkpoint.CheckpointSaveError, match=r"step \[20\].*No space left.*free space there"):
    Trainer(tiny_config, str(tmp_path / "run")).run()
  logged = events(tmp_path / "run")
  assert [e["steps"] for e in logged if e["event"] == "checkpoint_failed"] == [[20]]
  # Stopped at the save of step 40 (whose own metrics were still to be fetched), not at the run's end.
  assert max(losses_by_step(tmp_path / "run")) in (39, 40)


def test_a_restart_over_a_changed_shard_list_goes_on_in_the_next_epoch(tiny_config, tmp_path, monkeypatch):
  """Shards added under the glob (a dataset still being uploaded) make the saved data position meaningless: the
  restart says so and goes on, instead of failing every relaunch, from the epoch after the one it was in. From epoch
  0, it replayed the run's first batches (found by review; with the dataset moved to another bucket, the same count
  of shards and the seed unchanged, sample for sample)."""
  tiny_config.train.update(steps=4, ckpt_every=4, log_every=1, eval_every=0)
  Trainer(tiny_config, str(tmp_path / "run")).run()
  write_synthetic_shards(tmp_path / "more", num_shards=1, seed=7)
  os.rename(tmp_path / "more" / "train-00000.tar", tmp_path / "shards" / "train-00002.tar")
  saved = json.loads((tmp_path / "run" / "checkpoints" / "4" / "data" / "metadata").read_text())["process_0"]
  epoch = 1 + max(stream["epoch"] for stream in saved["streams"].values())
  tiny_config.train.steps = 6
  opened = []
  original = Trainer._pipeline


  def pipeline(self, role, shards, seed, position=None, **kwargs):
    if role == "train":
      opened.append(position)
    return original(self, role, shards, seed, position, **kwargs)

  monkeypatch.setattr(Trainer, "_pipeline", pipeline)
  Trainer(tiny_config, str(tmp_path / "run")).run()
  assert max(losses_by_step(tmp_path / "run")) == 6
  resets = [e for e in events(tmp_path / "run") if e["event"] == "data_position_reset"]
  assert len(resets) == 1 and "the shard list changed since the position was taken (2 shards then, 3 now" in \
      resets[0]["message"] and f"goes on from the start of epoch {epoch}, a shuffle this run has not read" in \
      resets[0]["message"]
  [position] = opened
  assert {g: (stream["epoch"], stream.get("shard_cursor", 0)) for g, stream in position["streams"].items()} == \
      {str(g): (epoch, 0) for g in range(tiny_config.data.streams)}
  # config.json now holds the relaunch's config; the run log keeps what changed, and from which step.
  changed = [e for e in events(tmp_path / "run") if e["event"] == "config_changed"]
  assert [(e["step"], e["changes"]) for e in changed] == [(4, {"train.steps": [4, 6]})]
  before = copy.deepcopy(tiny_config.train)
  before.steps = 4
  assert changed[0]["lr_at_step"] == pytest.approx([float(learning_rate_schedule(before)(4)),
                                                    float(learning_rate_schedule(tiny_config.train)(4))])
  assert changed[0]["lr_at_step"][0] < changed[0]["lr_at_step"][1]  # 0 at the old end; up again
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 6


def test_a_launch_records_the_hub_commit_of_its_shards_and_a_commit_of_no_shard_keeps_the_position(tiny_config,
                                                                                                    tmp_path):
  """Each launch lists hf:// shards at the dataset's commit of then, and writes which one to the run's events
  (`shards_listed`): nothing recorded what a run trained on. A relaunch after a commit that changed no shard (a
  README edit) lists a newer commit and goes on from its data position, not from another epoch."""
  root, repo = str(tmp_path / "hub"), tmp_path / "hub" / "org" / "echo"
  repo.mkdir(parents=True)
  for path in list_shards(tiny_config.data.train_shards):
    shutil.copy(path, repo)
  spec = "hf://datasets/org/echo/*.tar"
  tiny_config.data.update(train_shards=spec, eval_shards="", cache_dir=str(tmp_path / "cache"))
  tiny_config.train.update(steps=2, ckpt_every=2, log_every=1, eval_every=0)
  with fake_hub.registered(root):
    Trainer(tiny_config, str(tmp_path / "run")).run()
    readme = fake_hub.commit(root, "org/echo", {"README.md": b"# Echo shards\n"})
    tiny_config.train.steps = 4
    Trainer(tiny_config, str(tmp_path / "run")).run()
  assert max(losses_by_step(tmp_path / "run")) == 4
  logged = events(tmp_path / "run")
  assert [(e["spec"], e["shards"], e["revisions"]) for e in logged if e["event"] == "shards_listed"] == [
      (spec, 2, [f"hf://datasets/org/echo@{fake_hub.REVISION}"]), (spec, 2, [f"hf://datasets/org/echo@{readme}"])]
  assert not [e for e in logged if e["event"] == "data_position_reset"]


def test_checkpoints_deleted_by_the_keep_policy_are_recorded(tiny_config, tmp_path):
  """Orbax applies a launch's keep policy to every step there: a relaunch without the keep_period of the launches
  before deleted the checkpoints they had kept for good, and nothing said so (found by review)."""
  tiny_config.train.update(steps=6, ckpt_every=2, log_every=2, eval_every=0, keep_checkpoints=1, keep_period=4)
  Trainer(tiny_config, str(tmp_path / "run")).run()
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["4", "6"]
  tiny_config.train.update(steps=8, keep_period=0)
  Trainer(tiny_config, str(tmp_path / "run")).run()
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["8"]
  deleted = [(e["steps"], e["message"]) for e in events(tmp_path / "run") if e["event"] == "checkpoints_deleted"]
  assert deleted == [([2], "deleted by the keep policy (train.keep_checkpoints=1, train.keep_period=4)"),
                     ([4, 6], "deleted by the keep policy (train.keep_checkpoints=1, train.keep_period=0)")]
  changed = [e["changes"] for e in events(tmp_path / "run") if e["event"] == "config_changed"]
  assert changed[0]["train.keep_period"] == [4, 0]


def test_a_launch_refused_at_the_memory_check_leaves_config_json_as_it_was(tiny_config, tmp_path, monkeypatch):
  """config.json records the config the run trained with: a relaunch with a larger batch that the memory check
  refuses must not overwrite it, or the next relaunch with the run's own config reports a change that never
  trained (found by review: it was written before the compile and the restore)."""
  tiny_config.train.update(steps=2, ckpt_every=2, log_every=1, eval_every=0)
  Trainer(tiny_config, str(tmp_path / "run")).run()
  record = (tmp_path / "run" / "config.json").read_text()
  bigger = copy.deepcopy(tiny_config)
  bigger.train.update(steps=4, batch_size=2 * tiny_config.train.batch_size)

  def refuse(compiled, devices, **kwargs):
    raise aot.MemoryLimitError("the train step needs more than 90% of the device memory")

  with monkeypatch.context() as patch:
    patch.setattr(aot, "check_memory", refuse)
    with pytest.raises(aot.MemoryLimitError):
      Trainer(bigger, str(tmp_path / "run")).run()
  assert (tmp_path / "run" / "config.json").read_text() == record
  assert not [e for e in events(tmp_path / "run") if e["event"] == "config_changed"]
  tiny_config.train.steps = 4
  Trainer(tiny_config, str(tmp_path / "run")).run()
  assert [e["changes"] for e in events(tmp_path / "run") if e["event"] == "config_changed"] == [
      {"train.steps": [2, 4]}]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 4


def test_processes_that_read_different_held_out_batches_skip_evaluation(tiny_config, tmp_path, monkeypatch):
  """Each process reads the whole held-out batches and keeps its rows; one that could not download a held-out shard
  the others read holds other samples, and the eval loss mixed rows of different batches without a word (found by
  review). Compared at the first evaluation: here a second process (stood in for) read other batches, so evaluation
  is off for the launch, said once, and training goes on."""
  tiny_config.train.update(steps=4, eval_every=2, log_every=1, ckpt_every=1000)
  real_gather, gathered = checkpoint.gather_per_process, []

  def two_processes(obj):  # a second process whose held-out digest differs
    gathered.append(obj)
    return real_gather(obj) + ([{"digest": "0" * 16, "error": None}] if held_out_report(obj) else [])

  monkeypatch.setattr(checkpoint, "gather_per_process", two_processes)
  Trainer(tiny_config, str(tmp_path / "run")).run()
  [digest] = [obj["digest"] for obj in gathered if held_out_report(obj)]  # compared once, at the step-0 evaluation
  assert len(digest) == 16 and digest != "0" * 16
  assert max(losses_by_step(tmp_path / "run")) == 4 and not eval_losses_by_step(tmp_path / "run")
  skipped = [e for e in events(tmp_path / "run") if e["event"] == "eval_skipped"]
  assert [e["step"] for e in skipped] == [0] and skipped[0]["message"].startswith(
      f"the processes read different held-out batches (digests by process: {digest}, {'0' * 16})")
  # The same data read again gives the same digest: the comparison does not refuse processes that agree.
  def one_process(obj):
    gathered.append(obj)
    return real_gather(obj)

  gathered.clear()
  monkeypatch.setattr(checkpoint, "gather_per_process", one_process)
  Trainer(tiny_config, str(tmp_path / "again")).run()
  assert sorted(eval_losses_by_step(tmp_path / "again")) == [0, 2, 4]
  assert [obj["digest"] for obj in gathered if held_out_report(obj)] == [digest]
  # Other held-out samples give another digest: it is of the batches read, not a constant.
  gathered.clear()
  tiny_config.data.eval_shards = write_synthetic_shards(tmp_path / "other", num_shards=1, seed=2, prefix="eval")
  tiny_config.train.update(steps=1, eval_every=1)
  Trainer(tiny_config, str(tmp_path / "other_run")).run()
  [other] = [obj["digest"] for obj in gathered if held_out_report(obj)]
  assert other != digest


def held_out_report(obj) -> bool:
  """Whether a `gather_per_process` payload is a process's report of its held-out read."""
  return isinstance(obj, dict) and obj.keys() == {"digest", "error"}


def test_held_out_data_that_cannot_be_read_turns_evaluation_off_and_training_goes_on(tiny_config, tmp_path):
  """A single held-out shard (the demo's case) that a process cannot read (given up after data.download_retries, or
  no usable sample in it) raised out of the first evaluation and stopped the run: a new run at step 0, a resumed one
  at its first evaluation, and on a pod every host (found by review)."""
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "eval-000000.tar").write_bytes(b"not a tar file at all" * 100)
  tiny_config.data.eval_shards = str(tmp_path / "eval" / "eval-000000.tar")
  tiny_config.train.update(steps=4, eval_every=2, log_every=1, ckpt_every=1000)
  Trainer(tiny_config, str(tmp_path / "run")).run()
  assert max(losses_by_step(tmp_path / "run")) == 4 and not eval_losses_by_step(tmp_path / "run")
  skipped = [e for e in events(tmp_path / "run") if e["event"] == "eval_skipped"]
  assert [e["step"] for e in skipped] == [0], skipped
  message = skipped[0]["message"]
  assert message.startswith("process 0 could not read the held-out batches (RuntimeError: "), message
  assert "stream 0 read 1 shards in a row without one usable sample" in message, message
  bad = [(e["data"], e["reason"], e["shard"]) for e in events(tmp_path / "run") if e["event"] == "skipped_sample"]
  assert bad == [("eval", "bad_tar", tiny_config.data.eval_shards)], bad


def test_config_changes_name_each_changed_field_against_the_runs_config_json(tiny_config, tmp_path):
  assert config_changes(tiny_config, str(tmp_path)) == {}  # a new run
  write_config_json(tiny_config, str(tmp_path))
  assert config_changes(tiny_config, str(tmp_path)) == {}
  changed = copy.deepcopy(tiny_config)
  changed.unlock()
  changed.train.lr = 1e-3
  changed.model.layers = tiny_config.model.layers + 1
  changed.train.new_field = "x"
  assert config_changes(changed, str(tmp_path)) == {
      "model.layers": [tiny_config.model.layers, tiny_config.model.layers + 1],
      "train.lr": [tiny_config.train.lr, 1e-3], "train.new_field": [None, "x"]}
  nan = copy.deepcopy(tiny_config)
  nan.train.cpu_peak_flops = float("nan")
  write_config_json(nan, str(tmp_path))
  assert config_changes(nan, str(tmp_path)) == {}  # NaN is NaN: no change at every launch (found by review)
  for damaged in ("{not json", "null", "[]"):  # "null" and "[]" crashed the launch (found by review)
    (tmp_path / "config.json").write_text(damaged)
    [(key, (before, now))] = config_changes(tiny_config, str(tmp_path)).items()
    assert key == "config.json" and before.startswith("unreadable (") and now == "rewritten"


def test_processes_that_see_different_checkpoints_are_refused(tiny_config, tmp_path, monkeypatch):
  """Hosts whose workdir is not one shared storage (or that another trainer writes) would each restore their own
  newest step and mix them: refused before the compile, naming what each process sees."""
  real_gather = checkpoint.gather_per_process

  def two_processes(obj):  # a second process that sees one more step than this one
    return real_gather(obj) + ([obj + [12]] if isinstance(obj, list) else [])

  monkeypatch.setattr(checkpoint, "gather_per_process", two_processes)
  compiled = []
  monkeypatch.setattr(StepFunctions, "compile", lambda *args, **kwargs: compiled.append(True))
  with pytest.raises(RuntimeError, match=r"different checkpoints .*process 0: none; process 1: \[12\].*shares"):
    Trainer(tiny_config, str(tmp_path / "run")).run()
  assert not compiled


def test_the_trainer_checks_the_compiled_step_against_device_memory(tiny_config, tmp_path, monkeypatch):
  """On CPU devices report no memory limit, so the check is shown here with a limit of 1 MB: refused before the
  first step, or trained with a warning under --force."""
  monkeypatch.setattr(aot, "device_memory_limit", lambda devices: 1 << 20)
  tiny_config.train.update(steps=2, eval_every=0, ckpt_every=1000)
  with pytest.raises(aot.MemoryLimitError, match=r"needs .* GiB per device .*--force"):
    Trainer(tiny_config, str(tmp_path / "refused")).run()
  assert not losses_by_step(tmp_path / "refused")
  # In the run's events too, where the dashboard shows it.
  assert [e["message"][:52] for e in events(tmp_path / "refused") if e["event"] == "error"] == [
      "the run stopped: MemoryLimitError: the train step ne"]
  # The eval step too, at its first use (here the step-0 evaluation), with the optimizer state held beside it.
  tiny_config.train.eval_every = 2
  real_check, resident = aot.check_memory, {}

  def recording_check(compiled, devices, **kwargs):
    resident[kwargs.get("name", "train step")] = kwargs.get("resident", 0)
    return real_check(compiled, devices, **kwargs)

  monkeypatch.setattr(aot, "check_memory", recording_check)
  with pytest.warns(RuntimeWarning) as warned:
    Trainer(tiny_config, str(tmp_path / "forced"), force=True).run()
  assert max(losses_by_step(tmp_path / "forced")) == 2
  forced = [str(w.message) for w in warned if "continuing because of --force" in str(w.message)]
  assert [m.split(" needs")[0] for m in forced] == ["the train step", "the eval step"]
  assert "GiB of optimizer state held beside it" in forced[1]
  mesh = sharding.make_mesh(tiny_config.mesh.to_dict())
  opt_state = sharded_abstract_state(Echo(model_config(tiny_config)), tiny_config, mesh).opt_state
  assert resident == {"train step": 0, "eval step": sharding.bytes_per_device(opt_state)}


def test_a_restarts_eval_step_is_checked_against_device_memory_once_compiled_not_at_its_first_evaluation(
    tiny_config, tmp_path, monkeypatch):
  """A restart compiles its eval step in the background after its first step; an eval step over the limit is refused
  as soon as that compilation ends, not eval_every steps of training later."""
  tiny_config.train.update(steps=2, ckpt_every=2, eval_every=0)
  Trainer(tiny_config, str(tmp_path / "run")).run()

  def compile_now(self):  # the compilation ends at once: the refusal's step does not depend on the compile's speed
    self.compile_eval()
    self._eval_compiling = InBackground("compiled", lambda: self.eval)
    self._eval_compiling.start()

  def eval_over_the_limit(compiled, devices, name="train step", **kwargs):
    if name == "eval step":
      raise aot.MemoryLimitError("the eval step needs more than 90% of the device memory")

  monkeypatch.setattr(StepFunctions, "compile_eval_in_background", compile_now)
  monkeypatch.setattr(aot, "check_memory", eval_over_the_limit)
  tiny_config.train.update(steps=12, eval_every=1000)
  with pytest.raises(aot.MemoryLimitError, match="the eval step needs"):
    Trainer(tiny_config, str(tmp_path / "run")).run()
  assert max(losses_by_step(tmp_path / "run")) == 3  # the restart's first step, logged once its second is queued


def test_a_restart_with_another_model_is_refused_before_the_compile_and_keeps_the_runs_config(
    tiny_config, tmp_path, monkeypatch):
  """A relaunch with a changed model would have failed after the compile with Orbax's advice to pad or truncate the
  arrays, and overwritten config.json, the record of the model the checkpoints hold (which inference reads)."""
  tiny_config.train.update(steps=2, ckpt_every=2, eval_every=0)
  Trainer(tiny_config, str(tmp_path / "run")).run()
  tiny_config.model.dim = 32
  compiled = []
  monkeypatch.setattr(StepFunctions, "compile", lambda *args, **kwargs: compiled.append(True))
  with pytest.raises(checkpoint.CheckpointRestoreError,
                     match=r"step 2 .* another model or optimizer config: params/\S+ is \[2, 64, 64\] in the "
                           r"checkpoint, this config needs \[2, 32, 32\];.* more\. Resume this run with"):
    Trainer(tiny_config, str(tmp_path / "run")).run()
  assert not compiled
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["dim"] == 64
  assert [e["step"] for e in events(tmp_path / "run") if e["event"] == "checkpoint_restore_failed"] == [2]
  assert not [e for e in events(tmp_path / "run") if e["event"] == "error"]  # logged once, as the failed restore


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
  """(config, run directory) of a tiny run trained to step 4, with checkpoints at steps 2 and 4; trained once for the
  tests that damage a copy of it."""
  root = tmp_path_factory.mktemp("four_step_run")
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(root / "shards")
  config.train.update(steps=4, ckpt_every=2, eval_every=0)
  Trainer(config, str(root / "run")).run()
  return config, root / "run"


@pytest.fixture
def run_copy(four_step_run, tmp_path):
  """A copy of `four_step_run` to damage: (its config, to change freely; its run directory)."""
  config, run = four_step_run
  shutil.copytree(run, tmp_path / "run")
  return copy.deepcopy(config), tmp_path / "run"


@pytest.mark.parametrize("damage", ["array file", "deleted array file", "tree metadata", "deleted tree metadata",
                                    "deleted meta", "deleted state", "emptied step"])
def test_a_damaged_checkpoint_is_named_with_the_step_the_run_resumes_from_once_it_is_set_aside(
    run_copy, tmp_path, damage):
  tiny_config, run = run_copy
  newest = run / "checkpoints" / "4"
  # Array files are read by the restore, after the compile; the tree's metadata by the check before it.
  largest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  damaged, cause = {"array file": (largest, r"ValueError: OUT_OF_RANGE: Error reading "),
                    "deleted array file": (largest, r"ValueError: FAILED_PRECONDITION: .*Not enough data"),
                    "tree metadata": (newest / "state" / "_METADATA", r"JSONDecodeError: "),
                    "deleted tree metadata": (newest / "state" / "_METADATA", r"FileNotFoundError: .*_METADATA is "
                                                                               r"missing"),
                    # Orbax's KeyError for a missing item was not taken for damage (found by review).
                    "deleted meta": (newest / "meta", rf"FileNotFoundError: {newest} has no meta\)"),
                    "deleted state": (newest / "state", rf"FileNotFoundError: {newest} has no state\)"),
                    "emptied step": (newest, rf"FileNotFoundError: {newest} has no state, data, meta\)")}[damage]
  if damage == "emptied step":
    shutil.rmtree(damaged)
    damaged.mkdir()
  elif damaged.is_dir():
    shutil.rmtree(damaged)
  elif damage.startswith("deleted"):
    damaged.unlink()
  else:
    # Every data file of the step, not only the largest: OCDBT's files may hold b-tree nodes that the merged tree
    # no longer reads, and on a loaded machine the largest was such a file (the restore then succeeded).
    for path in [damaged] if damage != "array file" else newest.glob("state/ocdbt.process_*/d/*"):
      os.truncate(path, path.stat().st_size // 2)
  tiny_config.train.steps = 6
  with pytest.raises(checkpoint.CheckpointRestoreError,
                     match=rf"step 4 .* failed \({cause}.* the step is damaged: move {newest} out of .* resumes from "
                           r"step 2$"):
    Trainer(tiny_config, str(tmp_path / "run")).run()
  # In the events once (a damaged array file fails in the restore's thread, after the compile).
  assert [(e["event"], e["step"]) for e in events(tmp_path / "run") if "fail" in e["event"] or e["event"] == "error"] \
      == [("checkpoint_restore_failed", 4)]
  os.rename(newest, tmp_path / "damaged-4")  # what the message says to do
  Trainer(tiny_config, str(tmp_path / "run")).run()
  restored = [e["step"] for e in events(tmp_path / "run") if e["event"] == "checkpoint_restored"]
  assert restored == [2] and max(losses_by_step(tmp_path / "run")) == 6


def _flip_lowest_bit(values: bytearray) -> None:
  values[0] ^= 1  # the lowest mantissa bit of one weight: a change of one unit in the last place


def _swap_first_two(values: bytearray) -> None:
  values[:8] = values[4:8] + values[:4]  # two weights change places: every value is still there, the sum is the same


@pytest.mark.parametrize("damage", [_flip_lowest_bit, _swap_first_two])
def test_a_damaged_array_in_a_checkpoint_is_found_by_its_checksum(run_copy, tmp_path, damage):
  """Orbax restores an array with one flipped bit, or with two of its values swapped, without complaint; the
  checksums stored with the step find it: the run is told to set the step aside like any other damaged step, and
  inference refuses the weights."""
  tiny_config, run = run_copy
  newest = run / "checkpoints" / "4"
  _, params = checkpoint.load_params(str(run))
  name, largest = max(((jax.tree_util.keystr(path, simple=True, separator="/"), np.asarray(leaf))
                       for path, leaf in jax.tree_util.tree_leaves_with_path(params)), key=lambda item: item[1].size)
  pattern = largest.reshape(-1)[largest.size // 2:largest.size // 2 + 16].tobytes()  # 16 float32 values
  files = [p for p in newest.rglob("*") if p.is_file() and pattern in p.read_bytes()]
  assert len(files) == 1 and files[0].read_bytes().count(pattern) == 1
  assert pattern[:4] != pattern[4:8]
  data = bytearray(files[0].read_bytes())
  at = data.index(pattern)
  values = data[at:at + len(pattern)]
  damage(values)
  data[at:at + len(pattern)] = values
  files[0].write_bytes(bytes(data))
  tiny_config.train.steps = 6
  with pytest.raises(checkpoint.CheckpointRestoreError,
                     match=rf"step 4 .* failed \(ChecksumMismatch: arrays that differ from those saved: "
                           rf"params/{name}\).* the step is damaged: move {newest} out of .* resumes from step 2$"):
    Trainer(tiny_config, str(tmp_path / "run")).run()
  with pytest.raises(checkpoint.ChecksumMismatch, match=rf"4: arrays that differ from those saved: params/{name}\. "):
    checkpoint.load_params(str(tmp_path / "run"))  # inference and --init_from


@pytest.mark.parametrize(("cause", "damaged"), [
    (ValueError("OUT_OF_RANGE: Error reading \"params.w/0.0\" in OCDBT database"), True),
    (FileNotFoundError("checkpoints/4/state/_METADATA"), True),
    (ValueError("UNAVAILABLE: GCS request failed"), False),  # storage unreachable: the step itself may be fine
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4.0G"), False),
    (RuntimeError("Gloo AllGather failed: Connection closed by peer"), False),  # another host failed first
])
def test_only_damage_to_the_steps_own_files_is_answered_with_setting_the_step_aside(tmp_path, cause, damaged):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  try:
    raise RuntimeError("Encountered error while reading array index") from cause
  except RuntimeError as wrapped:
    message = str(ckpt._unreadable(4, wrapped))
  assert f"({type(cause).__name__}: {str(cause)[:30]}" in message
  assert ("step is damaged: move" in message) == damaged
  assert ("left as it is" in message) == (not damaged)


@pytest.mark.parametrize("field", ["log_every", "ckpt_every", "batch_size", "max_nonfinite", "steps",
                                   "keep_checkpoints"])
def test_a_count_below_its_least_value_is_refused_before_anything_naming_the_field(tiny_config, tmp_path, field):
  """Once, log_every=0 failed with a ZeroDivisionError after the compile; max_nonfinite=0 stopped the run blaming
  non-finite losses that were finite."""
  tiny_config.train[field] = 0
  refusal = rf"config\.train\.{field} must be at least 1, got 0: give --config\.train\.{field} a value at least 1"
  with pytest.raises(ValueError, match=refusal):
    Trainer(tiny_config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  tiny_config.train[field] = 1
  tiny_config.train.eval_every = -1
  with pytest.raises(ValueError, match=r"config\.train\.eval_every must be at least 0, got -1.*0 turns it off"):
    Trainer(tiny_config, str(tmp_path / "run"))


@pytest.mark.parametrize("field, value, refusal", [
    ("train.lr", -1.0, r"config\.train\.lr must be above 0, got -1\.0"),
    # b2=1 made the first update NaN (Adam's bias correction divides by 1 - b2), which was saved in every checkpoint;
    # a dropout of 10 dropped every text and speaker; warmup_frac=5 never reached the peak rate; the data's own
    # settings failed only after the compile (found by review).
    ("train.b2", 1.0, r"config\.train\.b2 must be in \[0, 1\), got 1\.0"),
    ("train.text_dropout", 10.0, r"config\.train\.text_dropout must be in \[0, 1\], got 10\.0"),
    ("train.warmup_frac", 5.0, r"config\.train\.warmup_frac must be in \[0, 1\], got 5\.0"),
    ("train.weight_decay", -1.0, r"config\.train\.weight_decay must be at least 0, got -1\.0"),
    ("seed", -1, r"config\.seed must be at least 0, got -1"),
    ("data.stall_timeout", 0.0, r"config\.data\.stall_timeout must be above 0, got 0\.0"),
    ("data.max_text_len", 1, r"config\.data\.max_text_len must be at least 2, got 1"),
    ("data.train_shards", "", r"config\.data\.train_shards is empty: give the training shards"),
    # 0 divided by zero deep in Flax or in the mesh; 0 layers trained a step and failed at the first save.
    ("model.layers", 0, r"config\.model\.layers=0 must be positive"),
    ("model.heads", 0, r"config\.model\.heads=0 must be positive"),
    ("mesh.data", 0, r"config\.mesh\.data=0: a mesh axis is a positive number of devices, or -1"),
    ("codec", "foo", r"config\.codec='foo' is not one of mel, dacvae, fish_pca, none"),
    ("model.dtype", "float16", r"dtype='float16' is not float32 or bfloat16"),
    # Taken as a local path: ./gs:/bucket/cache was made and filled.
    ("data.cache_dir", "gs://bucket/cache", r"config\.data\.cache_dir='gs://bucket/cache' is not on this machine"),
    # JAX's IndivisibleError named a sharding and its tiling factors, not the field.
    ("train.batch_size", 12, r"batch size 12 is not a positive multiple of the 8 data-parallel devices .*"
                             r"set --config\.train\.batch_size to a multiple of 8")])
def test_a_value_no_run_can_use_is_refused_before_anything(tiny_config, tmp_path, field, value, refusal):
  """A negative lr trained (the loss ran up to thousands), float16 trained without the loss scaling it needs, and
  an unknown codec trained and failed only at inference (found by review)."""
  *section, name = field.split(".")
  (tiny_config[section[0]] if section else tiny_config)[name] = value
  with pytest.raises(ValueError, match=refusal):
    Trainer(tiny_config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--workdir=", "--init_from= "])
def test_an_empty_workdir_or_init_from_is_refused_not_taken_as_not_given(tmp_path, flag):
  """`--workdir=$RUN` with RUN unset trained into the current directory; `--init_from=$WEIGHTS` with it unset trained
  from random weights instead of fine-tuning, with nothing said (found by review)."""
  args = [flag] if flag.startswith("--workdir") else [f"--workdir={tmp_path / 'run'}", flag]
  command = [sys.executable, str(REPO / "train_pretrain.py"), f"--config={REPO / 'configs' / 'tiny.py'}", *args]
  process = subprocess.run(command, cwd=tmp_path, env=cpu_env(1), capture_output=True, text=True, timeout=120)
  name = flag.split("=")[0]
  assert process.returncode == 1 and f"{name} is empty (an unset shell variable?)" in process.stderr, process.stderr
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag, message", [
    ("--config.train.b2=1.0", "error: config.train.b2 must be in [0, 1), got 1.0: give --config.train.b2 a value"),
    ("--config.train.batch_size=3", "error: batch size 3 is not a positive multiple of the 2 data-parallel devices"),
    ("--workdir={tmp}/a_file", "error: the run directory {tmp}/a_file is a file: give a directory"),
])
def test_a_refused_launch_prints_what_to_do_without_a_traceback(tiny_config, tmp_path, flag, message):
  """A config the trainer refuses printed some thirty lines of traceback, its message on the last (found by review):
  now the message alone, exit 1."""
  (tmp_path / "a_file").write_text("")
  command = [sys.executable, str(REPO / "train_pretrain.py"), f"--config={REPO / 'configs' / 'tiny.py'}",
             f"--workdir={tmp_path / 'run'}", f"--config.data.train_shards={tiny_config.data.train_shards}",
             flag.format(tmp=tmp_path)]
  process = subprocess.run(command, cwd=tmp_path, env=cpu_env(2), capture_output=True, text=True, timeout=120)
  assert process.returncode == 1, process.stderr[-3000:]
  assert message.format(tmp=tmp_path) in process.stderr and "Traceback" not in process.stderr, process.stderr[-3000:]
  assert not (tmp_path / "run").exists()


def test_a_relaunch_with_nothing_left_to_train_says_so_without_compiling(tiny_config, tmp_path, monkeypatch):
  """A relaunch at or past train.steps compiled the step (minutes on a pod), then exited 0 without a word; a
  shortened train.steps (a typo) went unnoticed (found by review)."""
  tiny_config.train.update(steps=4, eval_every=0)
  Trainer(tiny_config, str(tmp_path / "run")).run()
  config_json = (tmp_path / "run" / "config.json").read_text()
  compiles = []
  monkeypatch.setattr(StepFunctions, "compile", lambda *args, **kwargs: compiles.append(1))
  tiny_config.train.steps = 3
  state = Trainer(tiny_config, str(tmp_path / "run")).run()
  assert int(state.step) == 4 and compiles == []
  last = events(tmp_path / "run")[-1]
  assert last["event"] == "nothing_to_train" and last["step"] == 4
  assert "the run is at step 4 already and train.steps=3: nothing to train" in last["message"]
  assert (tmp_path / "run" / "config.json").read_text() == config_json


def test_ctrl_c_on_a_direct_run_saves_a_checkpoint_and_exits_0(tiny_config, tmp_path):
  """Ctrl-C on `train_pretrain.py` printed a KeyboardInterrupt traceback and lost every step since the last
  checkpoint (found by review). The first Ctrl-C now stops the run as SIGTERM does: a checkpoint after the step in
  progress, then exit 0."""
  tiny_config.train.update(steps=100_000, log_every=1, ckpt_every=100_000, eval_every=0)
  workdir = tmp_path / "run"
  command = [sys.executable, str(REPO / "train_pretrain.py"), f"--config={REPO / 'configs' / 'tiny.py'}",
             f"--workdir={workdir}", f"--config.data.train_shards={tiny_config.data.train_shards}",
             *(f"--config.train.{key}={tiny_config.train[key]}" for key in ("steps", "log_every", "ckpt_every",
                                                                           "eval_every"))]
  process = subprocess.Popen(command, cwd=REPO, env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  try:
    wait_for(lambda: (workdir / "metrics.jsonl").exists() and len(losses_by_step(workdir)) >= 3, timeout=120)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == 0, stderr[-3000:]
  assert "Ctrl-C: a checkpoint is saved after the step in progress" in stderr and "KeyboardInterrupt" not in stderr
  stopped = [e for e in events(workdir) if e["event"] == "stopped"]
  assert len(stopped) == 1 and (workdir / "checkpoints" / str(stopped[0]["step"])).is_dir()
  # What launch.sh tells a stopped run from a finished one by (both exit 0).
  assert f"stopped at step {stopped[0]['step']} of 100000; relaunch to resume\n" in stdout


def test_a_stop_saves_before_that_steps_evaluation_and_hooks_and_skips_them(tiny_config, tmp_path, capsys):
  """A preemption has a grace period before the kill: the step it stops at saves at once. Before, an evaluation or
  a sample hook due at that step ran first (on a restart the eval step's compile too), and the line telling
  launch.sh that the run stopped short was printed before its checkpoint was written (found by review)."""
  tiny_config.train.update(steps=6, eval_every=3, log_every=1, ckpt_every=1000)
  stop, hooked = threading.Event(), []

  def hook(info):
    hooked.append(info.step)
    if info.step == 2:
      stop.set()  # seen after step 3: the run stops there, a step due for evaluation and for this hook

  Trainer(tiny_config, str(tmp_path / "run"), hooks=((1, hook),), stop_requested=stop).run()
  assert hooked == [1, 2] and sorted(eval_losses_by_step(tmp_path / "run")) == [0]
  assert checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=3).all_steps() == [3]
  assert "stopped at step 3 of 6; relaunch to resume" in capsys.readouterr().out
  # The last step is no stop short of the end: its evaluation and hooks run as in any finished run.
  stop.clear()
  hooked.clear()

  def stop_at_the_end(info):
    hooked.append(info.step)
    if info.step == 5:
      stop.set()

  Trainer(tiny_config, str(tmp_path / "run"), hooks=((1, stop_at_the_end),), stop_requested=stop).run()
  assert hooked == [4, 5, 6] and "stopped at step" not in capsys.readouterr().out
  # The relaunch evaluates the state saved at step 3 before its first step: the loss the stopped launch skipped.
  tiny_config.train.update(steps=6, eval_every=3, log_every=1, ckpt_every=1000)
  Trainer(tiny_config, str(tmp_path / "reference")).run()
  assert eval_losses_by_step(tmp_path / "run") == eval_losses_by_step(tmp_path / "reference")
  assert sorted(eval_losses_by_step(tmp_path / "run")) == [0, 3, 6]


def test_a_launch_failing_once_its_data_is_open_closes_the_data(tiny_config, tmp_path, monkeypatch):
  """The training data opens beside the compile; a failure after that and before training (the listing of the
  checkpoints) left it open, its reader threads reading and downloading on (found by review)."""
  closed, listings = [], []
  real_pipeline, real_all_steps = Trainer._pipeline, checkpoint.Checkpointer.all_steps

  def recording(self, role, *args, **kwargs):
    pipeline = real_pipeline(self, role, *args, **kwargs)
    real_close = pipeline.close
    pipeline.close = lambda: (closed.append(role), real_close())
    return pipeline

  def failing_after_the_first(self):
    listings.append(1)
    if len(listings) > 1:  # the first is the launch's resume step, before the data opens
      raise OSError("the checkpoints could not be listed")
    return real_all_steps(self)

  monkeypatch.setattr(Trainer, "_pipeline", recording)
  monkeypatch.setattr(checkpoint.Checkpointer, "all_steps", failing_after_the_first)
  tiny_config.train.update(steps=2, eval_every=0)
  with pytest.raises(OSError, match="could not be listed"):
    Trainer(tiny_config, str(tmp_path / "run")).run()
  assert closed == ["train"]
