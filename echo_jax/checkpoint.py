"""Checkpoints (DESIGN §7): an Orbax CheckpointManager holding the train state, every process's data position
and run metadata; plus export/import of the plain pickle format used by earlier Echo JAX code.

A step directory becomes visible to `latest_step` only once Orbax has committed it, so a save interrupted by a
crash or SIGKILL is never restored; the previous complete checkpoint is.
"""

from __future__ import annotations

import concurrent.futures
import json
import pickle
import time
from collections.abc import Callable
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from echo_jax import executable_cache, storage
from echo_jax.config import model_config, write_config_json
from echo_jax.data.cache import describe
from echo_jax.model import Echo
from echo_jax.train.state import TrainState, create_train_state


class _CheckpointManager(ocp.CheckpointManager):
  """Orbax's manager without its own calls of JAX's preemption sync point.

  JAX keeps one counter per process: the last value passed to `reached_preemption_sync_point`, which a notice's
  protocol reads at any moment. The Trainer passes the steps of its launch (see `Trainer._should_stop`); Orbax
  passes the training step of each save, on every host in `save` and on process 0 from its finalize thread when a
  save ends. Read then, a resumed run's sync point lands thousands of steps away (seen: a SIGTERM right after a save
  stopped a 2-host run 9 steps late), and process 0's counter can be set back below a step it has passed, so that
  the others stop without it. Orbax uses the answer only for logs and metrics here (every save is forced).

  Its `close` also waits for the clean-up of interrupted saves that the manager starts in a thread when it opens
  (Orbax's leaves it running): a launch failing moments after opening the manager would exit under that thread, which
  then prints a traceback below the launch's own error."""

  def reached_preemption(self, step: int) -> bool:
    return False

  def close(self) -> None:
    self._maybe_await_cleanup_tmp_directory()
    super().close()


# Orbax's replica-parallel save (its default off GPU) has each replica of a replicated array write a slice of it.
# Each slice is an eager program, compiled per device and offset at a process's first save, in the save's blocking
# part: 48 compiles took 1.2 s of the tiny config's first save over 8 CPU devices, against 0.1 s without. Under FSDP
# only norm scales and biases are replicated (1.8 MB of echo_1p3b's 15.6 GB state), too small to gain from being
# split; a data-parallel mesh's replicated weights, with slices of at least this size, are still split.
REPLICA_PARALLEL_MIN_BYTES = 16 << 20


class _TypeHandlers:
  """Orbax's global type handlers, but for jax.Array the handler of `REPLICA_PARALLEL_MIN_BYTES`. (Orbax's public
  way to set that option, `register_standard_handlers_with_options`, changes the handlers of the whole process.)"""

  def __init__(self) -> None:
    default = ocp.type_handlers.get_type_handler(jax.Array)
    # The store of per-array metadata that Orbax's own handler writes (Orbax reads this attribute itself, too).
    self.arrays = ocp.type_handlers.ArrayHandler(array_metadata_store=default._array_metadata_store,
                                                 min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)

  def get(self, ty: Any) -> Any:
    if ty == self.arrays.typestr() or (isinstance(ty, type) and issubclass(ty, jax.Array)):
      return self.arrays
    return ocp.type_handlers.get_type_handler(ty)

  def has(self, ty: Any) -> bool:
    return ocp.type_handlers.has_type_handler(ty)


def gather_per_process(obj: Any) -> list[Any]:
  """Every process's JSON-serialisable `obj`, in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  encoded = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32))
  # Padded to a power of two: each new length would compile another all-gather (jit specialises on shapes), and the
  # data positions gathered at every save change length often; this keeps it to a few per run.
  padded = np.zeros(1 << max(int(lengths.max()) - 1, 0).bit_length(), np.uint8)
  padded[:encoded.size] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(gathered, lengths.reshape(-1), strict=True)]


class CheckpointSaveError(RuntimeError):
  """A background save failed; the checkpoints before it are intact."""


class ChecksumMismatch(ValueError):
  """Arrays restored from a checkpoint are not the arrays that were saved (a bit flipped on disk or in transit)."""


# The items of every step: the train state, each process's data position, and the step's metadata (checksums...).
ITEMS = ("state", "data", "meta")


class CheckpointRestoreError(RuntimeError):
  """Checkpoint `step` does not hold this config's train state, or cannot be read."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


# TensorStore's codes for a file of the checkpoint that is short, corrupt or absent (a deleted array file shows as
# FAILED_PRECONDITION "Not enough data", a truncated JSON file of the step as FAILED_PRECONDITION "Invalid JSON").
_DAMAGE_CODES = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "FAILED_PRECONDITION")


def _root_cause(error: BaseException) -> BaseException:
  """The error at the root of `error`'s chain: Orbax wraps TensorStore's error, which names the file, in one that
  does not."""
  while error.__cause__ is not None:
    error = error.__cause__
  return error


def _is_damage(cause: BaseException) -> bool:
  """Whether `cause` (the root of a failed restore) is damage to the checkpoint's own files, not a failure around
  them (storage unreachable, out of memory, a host lost)."""
  return (isinstance(cause, (FileNotFoundError, json.JSONDecodeError, EOFError, ChecksumMismatch))
          or str(cause).split(":")[0] in _DAMAGE_CODES)


def _array_specs(tree: Any, dtypes: bool) -> dict[str, str]:
  """path -> shape (`[2, 64, 64]`, with `dtypes` `float32[2, 64, 64]`) of every array in `tree`, the path as Orbax
  stores it (`opt_state/1/0/mu/...`), so that a stored tree's metadata and a live (or abstract) state compare leaf by
  leaf."""
  return {jax.tree_util.keystr(path, simple=True, separator="/"):
          f"{np.dtype(leaf.dtype).name if dtypes else ''}{list(leaf.shape)}"
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _word_sums(tree: Any) -> Any:
  """Per array, two sums modulo 2**32 of its elements' bit patterns read as unsigned integers `w[i]` (i: the flat
  index): `sum(w[i])` and `sum((2i + 1) * w[i])`. Any change to one element changes both (an odd weight is invertible
  modulo 2**32); the weighted sum also finds elements swapped or shifted, which leave the plain sum as it was. Integer
  sums are the same whatever the sharding and the order of the reduction."""
  def word_sums(leaf: jax.Array) -> jax.Array:
    words = jax.lax.bitcast_convert_type(leaf, _UNSIGNED[jnp.dtype(leaf.dtype).itemsize]).astype(jnp.uint32)
    # The flat index, from one iota per axis (a reshaped iota could move data between shards).
    index, stride = jnp.zeros(leaf.shape, jnp.uint32), 1
    for axis in reversed(range(leaf.ndim)):
      index = index + jax.lax.broadcasted_iota(jnp.uint32, leaf.shape, axis) * jnp.uint32(stride % 2**32)
      stride *= leaf.shape[axis]
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum((2 * index + 1) * words, dtype=jnp.uint32)])
  return jax.tree.map(word_sums, tree)


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (shardings included) of the arrays of `tree`."""
  return jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None)), tree)


def _compile_word_sums(tree: Any) -> Callable[[Any], Any]:
  """`_word_sums` compiled for `tree` (ShapeDtypeStructs with shardings on one mesh); kept in the executable cache
  like the train step, so that a warm launch loads it untraced (0.07 s for the demo's 210 arrays on CPU, against a
  0.6 s compile)."""
  mesh = next((leaf.sharding.mesh for leaf in jax.tree.leaves(tree)
               if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)), None)
  if mesh is None:
    return _word_sums.lower(tree).compile()
  key = executable_cache.program_key("checksums", ml_collections.ConfigDict(), mesh, tree)
  return executable_cache.compile_cached(key, lambda: _word_sums.lower(tree), mesh, tree)


def checksums(tree: Any, word_sums: Callable[[Any], Any] = _word_sums) -> dict[str, list]:
  """path -> [dtype, sum, weighted sum] (`_word_sums`) of every array of `tree` (a collective in a multi-process run:
  every process calls it), stored with each checkpoint and checked on restore. On the devices: a read of the state,
  milliseconds on an accelerator. `word_sums`: `_word_sums` or its executable compiled for `tree`'s shapes and
  shardings."""
  sums = jax.device_get(word_sums(tree))
  return {jax.tree_util.keystr(path, simple=True, separator="/"): [np.dtype(leaf.dtype).name, *map(int, pair)]
          for (path, leaf), pair in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(sums),
                                        strict=True)}


def checksum_differences(stored: dict[str, list], tree: Any, word_sums: Callable[[Any], Any] = _word_sums,
                         limit: int = 3) -> list[str]:
  """The arrays of `tree` whose checksum is not the `stored` one (`checksums` of the tree that was saved); arrays
  restored into another dtype (the restore casts) or absent from `stored` are not compared. A step saved before the
  weighted sum was stored (`[dtype, sum]`) is compared on its plain sum."""
  differences = [path for path, (dtype, *sums) in checksums(tree, word_sums).items()
                 if path in stored and stored[path][0] == dtype and stored[path][1:] != sums[:len(stored[path]) - 1]]
  return differences[:limit] + ([f"{len(differences) - limit} more"] if len(differences) > limit else [])


def verify_checksums(stored: dict[str, list], tree: Any, word_sums: Callable[[Any], Any] = _word_sums,
                     where: str = "", advice: str = "") -> None:
  """Raises ChecksumMismatch naming the arrays of `tree` that differ from the `stored` checksums (see
  `checksum_differences`), after `where` and followed by `advice`."""
  differences = checksum_differences(stored, tree, word_sums)
  if differences:
    raise ChecksumMismatch(f"{where}arrays that differ from those saved: {', '.join(differences)}{advice}")


def state_differences(stored: Any, expected: Any, limit: int = 3, dtypes: bool = False) -> list[str]:
  """The first `limit` differences in array names and shapes (and with `dtypes` dtypes) between two trees of arrays
  (or their metadata), then a count of the rest."""
  have, want = _array_specs(stored, dtypes), _array_specs(expected, dtypes)
  differences = [f"{path} is missing from the checkpoint" for path in want if path not in have]
  differences += [f"{path} is in the checkpoint but not in this config's state" for path in have if path not in want]
  differences += [f"{path} is {have[path]} in the checkpoint, this config needs {want[path]}"
                  for path in want if path in have and have[path] != want[path]]
  if len(differences) > limit:
    differences = differences[:limit] + [f"{len(differences) - limit} more"]
  return differences


class Checkpointer:
  """Async Orbax saves, keeping the newest `keep` steps and every `keep_period`-th step.

  The state's arrays are stored without zstd unless `compression` is set: on float32 weights and moments with
  trained-like (noisy) values it saved 7.5% of the bytes and made restores 1.4-1.7x slower (bench/checkpoint.py). A
  restart waits for the restore; the disk seldom matters. Either kind restores, whatever this setting.

  `restore_gb` bounds the bytes a restore holds read but not yet on the devices (Orbax's `restore_concurrent_gb`;
  None: Orbax's default, 96 GB). Orbax reads every array at once up to that bound and then copies them to the
  devices one by one; a smaller bound lets the copies of arrays already read run beside the reads of the rest. Use
  `restore_budget_gb` for a value that admits the state's largest array.
  """

  def __init__(self, directory: str, *, keep: int, keep_period: int = 0, async_save: bool = True,
               compression: bool = False, restore_gb: float | None = None):
    if keep < 1:  # Orbax would delete every checkpoint, the one just written included
      raise ValueError(f"train.keep_checkpoints must be at least 1, got {keep}")
    self.directory = storage.orbax_path(directory)
    self.incomplete = self._incomplete_saves()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_period or None,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    # Orbax types the bound as whole GB but multiplies it into bytes, so a fraction works (and the tests use one).
    handlers = {"state": ocp.PyTreeCheckpointHandler(use_compression=compression, restore_concurrent_gb=restore_gb,
                                                     type_handler_registry=_TypeHandlers()),
                "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self.manager = _CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._word_sums: dict[Any, Callable[[Any], Any]] = {}  # `_compile_word_sums` by the layout it was compiled for

  def _checksum_program(self, abstract_state: Any) -> Callable[[Any], Any]:
    """The checksum program of a state laid out as `abstract_state`, compiled or loaded once: by the first save of a
    new run, which stores it in the executable cache, so that the restart after a preemption loads it too (compiled
    there, it took 0.3 s of the demo's 1.9 s warm restart on 2 CPU cores)."""
    leaves, treedef = jax.tree.flatten(abstract_state)
    layout = (treedef, tuple((leaf.shape, jnp.dtype(leaf.dtype), leaf.sharding) for leaf in leaves))
    if layout not in self._word_sums:
      self._word_sums[layout] = _compile_word_sums(abstract_state)
    return self._word_sums[layout]

  def _incomplete_saves(self) -> list[str]:
    """Step directories left by an interrupted save, found before Orbax cleans them: locally, under Orbax's temporary
    names; on gs://, where Orbax writes a step in place, step directories without its completion mark."""
    if not self.directory.exists():
      return []
    paths = list(self.directory.iterdir())
    steps = [path for path in paths if path.name.isdigit()]
    # A request per step on gs://, at every launch of every host: asked together.
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
      finalized = list(pool.map(ocp.step.is_checkpoint_finalized, steps))
    return sorted([path.name for path in paths if ".orbax-checkpoint-tmp" in path.name]
                  + [path.name for path, done in zip(steps, finalized, strict=True) if not done])

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def newest_on_storage(self) -> int | None:
    """The newest complete step that the storage holds now. Orbax's own list (`latest_step`) drops the steps its
    keep policy will delete as soon as a save begins: after a failed save with keep_checkpoints=1 it named no step,
    while the step before was still there, whole (found by review)."""
    return max(ocp.utils.checkpoint_steps(self.directory), default=None)

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_positions: list[Any], meta: dict[str, Any]) -> None:
    """Starts a save of `step` (returns once device buffers are copied; the write continues in the background).

    The caller decides the cadence; all processes must call this at the same step. The state's `checksums` go into
    the metadata, and `restore` checks them.
    """
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave({f"process_{i}": position for i, position in enumerate(data_positions)}),
        meta=ocp.args.JsonSave({**meta, "step": step, "time": time.time(),
                                "checksums": checksums(state, self._checksum_program(_abstract(state)))}),
    )
    self.manager.save(step, args=args, force=True)

  def check_state(self, step: int, abstract_state: TrainState) -> None:
    """Raises CheckpointRestoreError when the state stored at `step` has other arrays (names, shapes) than
    `abstract_state`: a model or optimizer config changed between launches of one run. From the checkpoint's
    metadata alone, so it fails a launch in seconds, before the compile, and not with Orbax's advice to pad or
    truncate the arrays. (A changed dtype passes: the restore casts.) A step without one of its items (state, data,
    meta: a directory deleted, or emptied) is damage, named with the step to fall back to: Orbax's KeyError for it
    was taken for a failure around the step, with the advice to relaunch, which could never help."""
    step_directory = self.directory / str(step)
    missing = [item for item in ITEMS if not (step_directory / item).exists()]
    if missing:
      raise self._unreadable(step, FileNotFoundError(f"{step_directory} has no {', '.join(missing)}"))
    try:
      stored = self.manager.item_metadata(step)["state"]
    except Exception as error:
      raise self._unreadable(step, error) from error
    if stored is None:  # Orbax writes the tree's metadata with every save: without it the step is damaged
      missing = FileNotFoundError(f"{self.directory / str(step) / 'state' / '_METADATA'} is missing")
      raise self._unreadable(step, missing)
    differences = state_differences(stored, abstract_state)
    if differences:
      raise CheckpointRestoreError(
          step, f"checkpoint step {step} in {self.directory} was written by another model or optimizer config: "
          f"{'; '.join(differences)}. Resume this run with the config it was started with (its config.json, left "
          "as it was), or train the new config in a new --workdir (--init_from=<this run's directory> starts "
          "it from this run's weights when only the optimizer changed)")

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """(state, data positions by process, meta) of `step`; the state takes the shardings of `abstract_state`,
    so a checkpoint written on one mesh restores onto another. A failure raises CheckpointRestoreError naming its
    cause, and for a damaged step which step to set aside and what the run resumes from then. Arrays whose checksum
    is not the one saved are such damage: Orbax reads a flipped bit without complaint (checkpoints written before
    checksums were stored are not checked)."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(abstract_state,
                                       restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
          data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore(),
      ))
      verify_checksums(restored["meta"].get("checksums", {}), restored["state"],
                       self._checksum_program(abstract_state))
    except Exception as error:
      raise self._unreadable(step, error) from error
    return restored["state"], restored["data"], restored["meta"]

  def _unreadable(self, step: int, error: Exception) -> CheckpointRestoreError:
    """The error for a failure to read step `step`: its root cause, and only when that is damage to the step's own
    files the advice to set the step aside (for any other cause, that would throw good progress away)."""
    cause = _root_cause(error)
    message = f"restoring checkpoint step {step} from {self.directory} failed ({describe(cause)})"
    if not _is_damage(cause):
      return CheckpointRestoreError(
          step, f"{message}; the checkpoint was left as it is: relaunch once the cause is fixed (with several "
          "hosts, the first one to fail holds the cause; launch.sh shows its log first)")
    earlier = [s for s in self.all_steps() if s < step]
    then = f"resumes from step {max(earlier)}" if earlier else "starts anew (there is no earlier checkpoint)"
    return CheckpointRestoreError(
        step, f"{message}. If the storage is reachable and a relaunch fails the same way, the step is damaged: move "
        f"{self.directory / str(step)} out of {self.directory} (keep it to inspect) and relaunch; the run then "
        f"{then}")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def close_after_failure(self) -> None:
    """`close` for a launch that is failing: an error of its own (e.g. storage refusing the clean-up of interrupted
    saves) is logged, not raised, so that the launch's error stays the one reported."""
    try:
      self.close()
    except Exception as error:  # noqa: BLE001 — any: the error being raised matters more
      logging.warning("closing the checkpoints of the failed launch failed too: %s", describe(error))


def restore_budget_gb(abstract_state: Any, gb: float) -> float | None:
  """The `restore_gb` of a Checkpointer restoring `abstract_state` under a budget of `gb` (0: unbounded, None).

  Orbax fails a restore (ValueError) when one array's shard is not below the bound, so the budget is raised to
  twice the largest array: that one in flight beside another. Whole arrays, not this process's shards, so that the
  bound is the same on every process and never too small whatever the sharding.
  """
  if gb < 0:
    raise ValueError(f"train.ckpt_restore_gb must be >= 0 (0 = unbounded), got {gb}")
  if gb == 0:
    return None
  largest = max(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(abstract_state))
  return max(gb, 2 * largest / 1e9)


def export_pickle(state: TrainState, samples_seen: int, path: str) -> None:
  """Writes {"params", "opt_state", "step", "samples_seen"} of numpy arrays (written whole, then renamed)."""
  params, opt_state = multihost_utils.process_allgather((state.params, state.opt_state), tiled=True)
  payload = {
      "params": flax.serialization.to_state_dict(jax.tree.map(np.asarray, params)),
      "opt_state": flax.serialization.to_state_dict(jax.tree.map(np.asarray, opt_state)),
      "step": int(np.asarray(state.step)),
      "samples_seen": int(samples_seen),
  }
  if jax.process_index() != 0:
    return
  with storage.whole_file(path) as partial, open(partial, "wb") as f:
    pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)


def import_pickle(path: str, template: TrainState) -> tuple[TrainState, int]:
  """Reads a plain pickle checkpoint (a local path or a gs:// URL) onto the structure of `template` (numpy leaves);
  returns (state, samples_seen).

  Raises ValueError naming the first parameter whose shape differs from the template.
  """
  try:
    with storage.orbax_path(path).open("rb") as f:
      payload = pickle.load(f)
  except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, IndexError) as error:
    # What a truncated or overwritten file raises (pickle's own errors and those of the opcodes it misreads).
    raise ValueError(f"{path} is not a readable pickle ({describe(error)}): the file is damaged or cut short; copy "
                     "it again, or export it again") from error
  if not isinstance(payload, dict):
    raise ValueError(f"{path} is not an Echo pickle checkpoint: it holds a {type(payload).__name__}, not a dict")
  missing = {"params", "opt_state", "step"} - set(payload)
  if missing:
    raise ValueError(f"{path} is not an Echo pickle checkpoint: missing {sorted(missing)}")
  try:
    params = flax.serialization.from_state_dict(template.params, payload["params"])
  except ValueError as error:  # flax's names no file, nor which parameters differ
    differences = "; ".join(state_differences(payload["params"], template.params))
    raise ValueError(f"{path}: its parameters are not those of the config: {differences or error}") from error
  opt_state = flax.serialization.from_state_dict(template.opt_state, payload["opt_state"])
  for (key, value), expected in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(template.params),
                                    strict=True):
    if np.shape(value) != tuple(expected.shape):
      raise ValueError(f"{path}: parameter {jax.tree_util.keystr(key)} has shape {np.shape(value)}, "
                       f"the config expects {tuple(expected.shape)}")
  state = TrainState(step=np.asarray(payload["step"], np.int32), params=params, opt_state=opt_state)
  return state, int(payload.get("samples_seen", 0))


# Parameters for inference and fine-tuning ------------------------------------------------------------------------


def _read_config(path: epath.Path) -> ml_collections.ConfigDict:
  try:
    values = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:  # the decoder's message alone did not name the file
    raise ValueError(f"the checkpoint's config {path} is not readable JSON ({error}): it is damaged; copy it again "
                     "from the run directory the checkpoint came from") from error
  if not isinstance(values, dict):
    raise ValueError(f"the checkpoint's config {path} holds a JSON {type(values).__name__}, not a config: it is "
                     "damaged; copy it again from the run directory the checkpoint came from")
  return ml_collections.ConfigDict(values)


PARAMS_CHECKSUMS = "checksums.json"


def save_params(params: Any, config: ml_collections.ConfigDict, directory: str) -> None:
  """Writes a parameters-only checkpoint, local or on gs://: DIRECTORY/params (Orbax), DIRECTORY/checksums.json
  (`checksums` of the parameters, which `load_params` checks) and DIRECTORY/config.json, last: a directory without it
  is no checkpoint to `load_params`, so one whose writing was cut short is never taken for whole. Stored without zstd,
  as the training checkpoints are (see `Checkpointer`)."""
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)).save(
      storage.orbax_path(storage.join(directory, "params")), args=ocp.args.PyTreeSave(params), force=True)
  storage.write_bytes(storage.join(directory, PARAMS_CHECKSUMS), json.dumps(checksums(params)).encode("utf-8"))
  write_config_json(config, directory)


def _restore_params(directory: epath.Path, abstract_params: Any, nested: bool,
                    damaged_advice: Callable[[], str]) -> Any:
  """Only the parameters (not the optimizer state) of an Orbax pytree, onto the first local device. A ValueError
  naming `directory` when its arrays (names, shapes) are not the config's, found from its metadata before any read
  (Orbax's own error advised padding or truncating the arrays), or when the read fails: with `damaged_advice()` where
  the files are damaged (a bare Orbax error and a traceback before, for a converted directory)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  item = {"params": abstract_params} if nested else abstract_params
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), item)
  where = directory.parent if nested else directory
  try:
    # The handler's metadata, not the checkpointer's: that one also looks for a step's metadata file, which a step's
    # item directory has not, and logs a warning of it.
    stored = ocp.PyTreeCheckpointHandler().metadata(directory)
    differences = state_differences(stored["params"] if nested else stored, abstract_params) if stored else []
    if not differences:
      restored = ocp.PyTreeCheckpointer().restore(
          directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=nested))
  except Exception as error:
    cause = _root_cause(error)
    message = f"reading the parameters of {where} failed ({describe(cause)})"
    if _is_damage(cause):
      message += f". If the storage is reachable, the files are damaged: {damaged_advice()}"
    raise ValueError(message) from error
  if differences:
    raise ValueError(f"the parameters in {where} are not those of the model config: {'; '.join(differences)}")
  return restored["params"] if nested else restored


def _restore_step_params(step_dir: epath.Path, abstract_params: Any) -> Any:
  """The parameters of a training checkpoint's step directory, checked against the checksums saved with them (a
  step saved before checksums were stored is not checked). A failed read raises a ValueError naming the step and,
  when its files are damaged, an earlier step to use instead."""
  def instead() -> str:  # listed only when damage is reported: a listing is a request on gs://
    earlier = [int(p.name) for p in step_dir.parent.iterdir()
               if p.name.isdigit() and step_dir.name.isdigit() and int(p.name) < int(step_dir.name)]
    return f"use an earlier step, e.g. {step_dir.parent / str(max(earlier))}" if earlier else "copy it again"

  params = _restore_params(step_dir / "state", abstract_params, nested=True, damaged_advice=instead)
  meta_dir = step_dir / "meta"
  try:
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir) if meta_dir.is_dir() else {}
  except Exception as error:
    raise ValueError(f"reading the metadata of {step_dir} failed ({describe(_root_cause(error))}). If the storage "
                     f"is reachable, the files are damaged: {instead()}") from error
  verify_checksums(meta.get("checksums", {}), {"params": params}, where=f"{step_dir}: ",
                   advice=". This copy of the step is damaged: copy it again from the run, or use an earlier step")
  return params


def _locate(path: str) -> tuple[str, epath.Path, epath.Path]:
  """(form, root, config file) of the checkpoint `path`, form one of "pickle", "params", "run" and "step". Raises
  FileNotFoundError when nothing is at `path`, and a ValueError that says what was expected when it is none of these."""
  root = storage.orbax_path(path)  # read where it is, local or gs://: Orbax and epath read both the same way
  if not root.exists():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if root.is_file():
    return "pickle", root, root.parent / "config.json"
  if (root / "params").is_dir() and (root / "config.json").exists():
    return "params", root, root / "config.json"
  if (root / "checkpoints").is_dir():
    return "run", root, root / "config.json"
  if (root / "state").is_dir():
    return "step", root, root.parent.parent / "config.json"
  raise ValueError(f"{path} is not a checkpoint: expected a run directory, an Orbax step directory "
                   "(checkpoints/<step>), a converted parameters directory, or a .pkl file")


def _config_of(form: str, config_file: epath.Path, path: str) -> ml_collections.ConfigDict:
  if form == "pickle" and not config_file.exists():
    raise ValueError(f"{path} is a pickle checkpoint without a config.json beside it; pass the config")
  return _read_config(config_file)


def load_config(path: str) -> ml_collections.ConfigDict:
  """The config of the checkpoint `path` (anything `load_params` reads), without its parameters: what depends on the
  config alone (the codec, the length of a generation) is checked before the parameters' load, minutes for a large
  model on gs://. Raises as `load_params` does."""
  path = path.rstrip("/")
  form, _, config_file = _locate(path)
  return _config_of(form, config_file, path)


def load_params(path: str, config: ml_collections.ConfigDict | None = None) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) from a run directory (its newest complete checkpoint), an Orbax step directory, a
  parameters-only directory (`save_params`), or a plain pickle file (config from `config` or a config.json beside
  it), local or on gs://. Raises FileNotFoundError when nothing is at `path`, and a ValueError that says what was
  expected when it is none of these. `config` (e.g. from `load_config`) is used instead of the checkpoint's own."""
  def abstract_params(cfg: ml_collections.ConfigDict) -> Any:
    model = Echo(model_config(cfg))
    return jax.eval_shape(lambda: create_train_state(model, jax.random.key(0), cfg)).params

  path = path.rstrip("/")
  form, root, config_file = _locate(path)
  if form == "run":
    manager = ocp.CheckpointManager(root / "checkpoints", options=ocp.CheckpointManagerOptions(create=False))
    steps = manager.all_steps()
    manager.close()
    if not steps:
      raise ValueError(f"run directory {path} has no complete checkpoint yet")
  if config is None:
    config = _config_of(form, config_file, path)
  if form == "pickle":
    template = jax.eval_shape(lambda: create_train_state(Echo(model_config(config)), jax.random.key(0), config))
    state, _ = import_pickle(path, template)
    return config, state.params
  if form == "params":
    params = _restore_params(root / "params", abstract_params(config), nested=False,
                             damaged_advice=lambda: "copy or convert them again")
    if (root / PARAMS_CHECKSUMS).exists():  # absent from directories written before checksums were stored
      verify_checksums(json.loads((root / PARAMS_CHECKSUMS).read_text()), params, where=f"{path}: ",
                       advice=". This copy of the parameters is damaged: copy or convert them again")
    return config, params
  if form == "run":
    return config, _restore_step_params(root / "checkpoints" / str(max(steps)), abstract_params(config))
  return config, _restore_step_params(root, abstract_params(config))
