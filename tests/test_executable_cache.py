"""The compiled-step cache (echo_jax.executable_cache): a relaunch loads its steps instead of tracing them and computes
the same (a resumed run too); anything that changes the program, or a damaged file, makes it compile again."""

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import fake_gcs
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from conftest import REPO, cpu_env, load_config, write_synthetic_shards
from etils import epath
from test_train import eval_losses_by_step, losses_by_step

from echo_jax import aot, executable_cache, sharding, watchdog
from echo_jax.config import HOST_ONLY_FIELDS, model_config
from echo_jax.model import Echo
from echo_jax.train import step
from echo_jax.train.state import example_inputs

# The start of each script below: `traced` records which step functions get traced, and when the checkpoints'
# checksum program is.
RECORD_TRACES = textwrap.dedent("""
    import jax
    from echo_jax import checkpoint
    from echo_jax.train import step
    traced = []
    for name in ("train_step", "eval_step"):
      def recording(*args, _step=getattr(step, name), _name=name, **kwargs):
        traced.append(_name)
        return _step(*args, **kwargs)
      setattr(step, name, recording)

    def recording_sums(tree, _sums=checkpoint._word_sums.__wrapped__):
      traced.append("checksums")
      return _sums(tree)
    checkpoint._word_sums = jax.jit(recording_sums)
""")

# One single-device process (the caches are off on several CPU devices): enables the compilation cache, compiles the
# train and eval steps of the config in argv[2], recording which step functions were traced, reads the state's
# shapes and shardings stored with the train step, and prints the losses of one eval and one train step on a fixed
# batch.
LAUNCH = RECORD_TRACES + textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    import ml_collections
    from echo_jax import runtime, sharding
    from echo_jax.config import model_config
    from echo_jax.model import Echo
    from echo_jax.train.state import create_train_state, example_inputs

    config = ml_collections.ConfigDict(json.loads(sys.argv[2]))
    assert runtime.enable_compilation_cache(sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # JAX's cache keeps even quick compiles
    model = Echo(model_config(config))
    mesh = sharding.make_mesh(config.mesh.to_dict())
    shapes = example_inputs(config, config.train.batch_size)
    steps = step.StepFunctions.compile(model, config, mesh, shapes)
    state = jax.jit(lambda key: create_train_state(model, key, config),
                    out_shardings=steps.state_shardings)(jax.random.key(0))
    cached = step.StepFunctions.cached_abstract_state(config, mesh, shapes)  # what a warm Trainer restores onto
    same_state = cached is not None and cached == step.sharded_abstract_state(model, config, mesh)
    batch = {name: jnp.ones(s.shape, s.dtype) for name, s in shapes.items()}
    eval_loss = float(steps.eval(state.params, batch, jax.random.key(1))["eval_loss"])
    state, metrics = steps.train(state, batch)
    print(json.dumps({"traced": traced, "cached": cached is not None, "same_state": same_state,
                      "loss": float(metrics["loss"]), "eval_loss": eval_loss}))
""")


# `train_pretrain.py`'s library call on one device.
TRAIN = RECORD_TRACES + textwrap.dedent("""
    import json, sys
    import ml_collections
    from echo_jax.train.entry import train_main

    train_main(ml_collections.ConfigDict(json.loads(sys.argv[1])), sys.argv[2])
    print(json.dumps({"traced": traced}))
""")


def run_one_device(script, *args, env=None):
  process = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env or cpu_env(1),
                           capture_output=True, text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-3000:]
  return json.loads(process.stdout.splitlines()[-1])


def train(config, workdir):
  return run_one_device(TRAIN, config.to_json(), workdir)


def launch(cache_dir, config):
  return run_one_device(LAUNCH, cache_dir, config.to_json())


def stored(cache_dir):
  """The keys of the stored executables; asserts that each has its inputs and that no temporary file is left."""
  folder = cache_dir / executable_cache.SUBDIRECTORY
  names = sorted(os.listdir(folder)) if folder.exists() else []
  keys = [name.removesuffix(".executable") for name in names if name.endswith(".executable")]
  assert names == sorted([f"{key}.executable" for key in keys] + [f"{key}.inputs" for key in keys])
  return keys


def test_a_relaunch_loads_its_steps_untraced_and_computes_the_same(tmp_path):
  config = load_config("tiny")
  first, relaunch = launch(tmp_path / "xla", config), launch(tmp_path / "xla", config)
  assert first["traced"] == ["train_step", "eval_step"]
  assert relaunch["traced"] == []  # both steps came from the cache
  assert relaunch["cached"] and relaunch["same_state"]  # the state's shapes and shardings as a trace gives them
  assert relaunch["loss"] == first["loss"] and relaunch["eval_loss"] == first["eval_loss"]
  assert len(stored(tmp_path / "xla")) == 2
  config.train.lr *= 2  # another train program (the schedule is compiled in): compiled again and stored beside
  assert launch(tmp_path / "xla", config)["traced"] == ["train_step", "eval_step"]
  # The eval program did not change: JAX's cache answered it, so it was not stored (see the next test).
  assert len(stored(tmp_path / "xla")) == 3


def test_on_gs_a_relaunch_loads_its_steps_from_the_bucket(tmp_path):
  """A pod keeps its compilation cache on gs://, shared by its hosts and their restarts: the executables and JAX's
  own cache entries go there through gcsfs (here to the GCS stand-in, tests/fake_gcs.py), and come back from it."""
  (tmp_path / "gcs" / "bucket").mkdir(parents=True)
  config = load_config("tiny")
  with fake_gcs.serve(str(tmp_path / "gcs")) as gcs:
    first, relaunch = (run_one_device(LAUNCH, "gs://bucket/xla", config.to_json(),
                                      env=fake_gcs.subprocess_env(gcs.url)) for _ in range(2))
  assert first["traced"] == ["train_step", "eval_step"]
  assert relaunch["traced"] == [] and relaunch["cached"] and relaunch["same_state"]
  assert relaunch["loss"] == first["loss"] and relaunch["eval_loss"] == first["eval_loss"]
  bucket = tmp_path / "gcs" / "bucket" / "xla"
  assert len(stored(bucket)) == 2
  assert any(name.endswith("-cache") for name in os.listdir(bucket))  # JAX's persistent cache is there too


def test_a_run_resumed_with_loaded_steps_gives_the_losses_of_an_uninterrupted_run(tmp_path):
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards")
  config.data.eval_shards = write_synthetic_shards(tmp_path / "shards", num_shards=1, seed=1, prefix="eval")
  config.train.update(steps=6, ckpt_every=3, eval_every=3)
  config.compile_cache_dir = str(tmp_path / "xla")
  workdir = tmp_path / "run"
  # Uninterrupted, with an empty cache: compiles both steps, and at the first save the checksum program, and stores
  # the three.
  assert train(config, workdir)["traced"] == ["train_step", "eval_step", "checksums"]
  assert len(stored(tmp_path / "xla")) == 3
  uninterrupted, evaluated = losses_by_step(workdir), eval_losses_by_step(workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  os.remove(workdir / "metrics.jsonl")
  # Resumed from step 3 by a warm launch: the steps and the checksum program are loaded, untraced; the state
  # restores onto their shardings, and its checksums match.
  assert train(config, workdir)["traced"] == []
  assert losses_by_step(workdir) == {step: uninterrupted[step] for step in (4, 5, 6)}
  assert eval_losses_by_step(workdir) == {6: evaluated[6]}
  assert len(stored(tmp_path / "xla")) == 3


def test_a_step_that_the_compilation_cache_answered_is_not_stored(tmp_path):
  config = load_config("tiny")
  first = launch(tmp_path / "xla", config)
  shutil.rmtree(tmp_path / "xla" / executable_cache.SUBDIRECTORY)
  answered = launch(tmp_path / "xla", config)  # JAX's cache answers both compiles
  assert answered["traced"] == ["train_step", "eval_step"]
  assert stored(tmp_path / "xla") == []  # see compile_cached: loaded back, they could fail
  again = launch(tmp_path / "xla", config)
  assert again["traced"] == ["train_step", "eval_step"]
  assert again["loss"] == first["loss"] and again["eval_loss"] == first["eval_loss"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  """The executable cache on, in tmp_path, without turning on JAX's compilation cache in this 8-device process."""
  monkeypatch.setattr(executable_cache, "directory", lambda: epath.Path(tmp_path))
  return tmp_path


def test_a_damaged_executable_is_reported_and_compiled_again(cache_dir, caplog):
  (cache_dir / "somekey.executable").write_bytes(b"half a file")
  (cache_dir / "somekey.inputs").write_bytes(b"half a file")
  inputs = jax.ShapeDtypeStruct((3,), jnp.float32)
  lowered = []

  def lower():
    lowered.append(True)
    return jax.jit(lambda x: x * 2 + 1).lower(inputs)

  # A program without shardings runs on the default device: a mesh of that one device.
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  with caplog.at_level(logging.WARNING):
    assert executable_cache.load_inputs("somekey", mesh) is None
    compiled = executable_cache.compile_cached("somekey", lower, mesh, inputs)
  assert lowered == [True] and "could not be read" in caplog.text and "could not be loaded" in caplog.text
  assert compiled(jnp.arange(3.0)).tolist() == [1.0, 3.0, 5.0]
  # Both files were replaced by good ones.
  reloaded = executable_cache.load("somekey", mesh)
  assert reloaded is not None and reloaded(jnp.arange(3.0)).tolist() == [1.0, 3.0, 5.0]
  assert executable_cache.load_inputs("somekey", mesh) == inputs
  assert executable_cache.compile_cached("somekey", lower, mesh, inputs) is not None and lowered == [True]
  assert sorted(os.listdir(cache_dir)) == ["somekey.executable", "somekey.inputs"]


class _Device:  # a device whose runtime allows `bytes_limit` bytes
  device_kind = "an accelerator not in the HBM table"

  def __init__(self, bytes_limit):
    self.bytes_limit = bytes_limit

  def memory_stats(self):
    return {"bytes_limit": self.bytes_limit}


def test_a_loaded_step_is_checked_against_memory_with_the_analysis_stored_beside_it(cache_dir):
  """Where a backend gives no memory analysis for a deserialized executable, the launch's memory check was skipped
  (a warning) at every warm restart, a step that its cold launch refused included, since the step is stored before
  the check (found by review; whether libtpu does is not known here). The analysis is stored with the executable."""
  inputs = jax.ShapeDtypeStruct((256, 256), jnp.float32)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  compiled = executable_cache.compile_cached("memkey", lambda: jax.jit(lambda x: x @ x + 1).lower(inputs), mesh,
                                             inputs)
  loaded = executable_cache.load("memkey", mesh)
  loaded.memory_analysis = lambda: None  # as a backend without analysis of a loaded executable answers
  assert aot.MemoryUsage.of(loaded) == aot.MemoryUsage.of(compiled)
  needed = aot.MemoryUsage.of(compiled).total
  with pytest.raises(aot.MemoryLimitError):
    aot.check_memory(loaded, [_Device(needed)])  # over 90% of the runtime's limit
  assert aot.check_memory(loaded, [_Device(2 * needed)]).total == needed


def test_a_loaded_entry_is_marked_used_for_the_disk_watchdog(tmp_path, monkeypatch):
  """The watchdog deletes entries unused for a week, judged by their files' times. A load only reads them, and under
  `noatime` (or within a day under `relatime`) a read leaves them alone: an entry every launch loaded counted as
  unused a week after it was written. Before, its files kept their old times here."""
  cache_dir = tmp_path / "xla" / executable_cache.SUBDIRECTORY  # where the watchdog looks for its entries
  monkeypatch.setattr(executable_cache, "directory", lambda: epath.Path(cache_dir))
  inputs = jax.ShapeDtypeStruct((3,), jnp.float32)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  key = "7" * 64
  executable_cache.compile_cached(key, lambda: jax.jit(lambda x: x * 3 - 1).lower(inputs), mesh, inputs)
  files = [cache_dir / f"{key}.executable", cache_dir / f"{key}.inputs"]
  written_long_ago = time.time() - 10 * 24 * 3600
  for path in files:
    os.utime(path, (written_long_ago, written_long_ago))
  assert [c.path for c in watchdog.find_candidates(str(tmp_path), keep_checkpoints=1)] == [str(files[0])]
  assert executable_cache.load(key, mesh)(jnp.arange(3.0)).tolist() == [-1.0, 2.0, 5.0]
  assert all(time.time() - path.stat().st_mtime < 60 for path in files)
  assert watchdog.find_candidates(str(tmp_path), keep_checkpoints=1) == []


def test_the_key_follows_the_step_the_config_and_the_inputs(cache_dir):
  config = load_config("tiny")
  mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
  inputs = jax.ShapeDtypeStruct((4, 8), jnp.float32)
  key = executable_cache.program_key("train", config, mesh, inputs)
  assert key == executable_cache.program_key("train", config, mesh, inputs)
  assert key != executable_cache.program_key("eval", config, mesh, inputs)
  assert key != executable_cache.program_key("train", config, mesh, jax.ShapeDtypeStruct((4, 9), jnp.float32))
  config.model.remat = "full" if config.model.remat != "full" else "none"
  assert key != executable_cache.program_key("train", config, mesh, inputs)


def changed(value):
  """Another value of `value`'s type."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value * 2 + 1
  return f"{value}_other"


def test_the_fields_no_step_reads_leave_the_steps_and_their_key_unchanged(cache_dir):
  """A relaunch that changes only HOST_ONLY_FIELDS (other shards, checkpoint cadence) loads the steps that the launch
  before it stored. Safe only while no step reads them: the steps lowered with every one of them changed must be the
  same programs (a field that a step comes to read fails here, and must leave the list)."""
  config = load_config("tiny")
  other = load_config("tiny")
  for name in HOST_ONLY_FIELDS:
    *parents, leaf = name.split(".")
    section = functools.reduce(getattr, parents, other)
    if isinstance(section[leaf], ml_collections.ConfigDict):
      section[leaf].update({field: changed(value) for field, value in section[leaf].items()})
    else:
      section[leaf] = changed(section[leaf])
  assert other != config
  mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
  model = Echo(model_config(config))
  state = step.sharded_abstract_state(model, config, mesh)
  other_state = step.sharded_abstract_state(model, other, mesh)
  assert jax.tree.leaves(other_state) == jax.tree.leaves(state)  # the key leaves the state out: it must follow
  shapes = example_inputs(config, config.train.batch_size)
  for lower in (functools.partial(step.lower_train_step, model), lambda c, *args: step.lower_eval_step(model, *args)):
    assert lower(other, mesh, other_state, shapes).as_text() == lower(config, mesh, state, shapes).as_text()
  assert executable_cache.program_key("train", other, mesh, shapes) == executable_cache.program_key(
      "train", config, mesh, shapes)
  config.train.lr *= 2  # a field a step reads: another program, another key
  assert step.lower_train_step(model, config, mesh, state, shapes).as_text() != step.lower_train_step(
      model, other, mesh, state, shapes).as_text()
  assert executable_cache.program_key("train", other, mesh, shapes) != executable_cache.program_key(
      "train", config, mesh, shapes)


def test_the_cache_is_off_without_the_compilation_cache(tmp_path):
  assert not jax.config.jax_compilation_cache_dir  # tests leave JAX's cache off (see conftest.py)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path))
  jax.config.update("jax_enable_compilation_cache", False)  # a directory, but the cache disabled
  try:
    assert executable_cache.directory() is None
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", None)
  config = load_config("tiny")
  mesh = sharding.make_mesh(config.mesh.to_dict(), jax.devices()[:1])
  assert executable_cache.directory() is None
  assert executable_cache.program_key("train", config, mesh, jax.ShapeDtypeStruct((1,), jnp.float32)) is None
