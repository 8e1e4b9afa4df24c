"""The training loop (DESIGN §4–§7): one `Trainer.run()` from a config to checkpoints and a run directory.

    list the shards ─► compile (or load) the train step ─┐
                       threads: restore or init ─► open ──┴► for each step: next batch ─► dispatch compiled step
                       the data there                         ─► log the PREVIOUS step's metrics
                                                              └─► hooks (eval, checkpoint, samples) on their cadence
                                                         ──► final checkpoint, wait for async saves

Between the listing and the compile, every process checks that it can use the workdir as the run will and that all
of them share it (`_check_workdir`): a run that could not save its checkpoints fails there, not at its first save.
Metrics of step N are fetched only after step N+1 has been dispatched, so the host never makes the device wait.
Everything that varies between runs (params, data order, timesteps, noise, dropout) derives from `config.seed`, and
the data position is part of every checkpoint: a resumed run computes exactly what an uninterrupted run would.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import glob
import hashlib
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from echo_jax import aot, checkpoint, metrics, runtime, sharding, storage
from echo_jax.background import InBackground
from echo_jax.config import check_config, config_changes, model_config, write_config_json
from echo_jax.data.cache import describe, is_local, remove_unclaimed
from echo_jax.data.pipeline import (
  StreamSet,
  batch_streams,
  check_shards,
  fresh_position,
  merge_stream_states,
  position_mismatch,
  read_position,
)
from echo_jax.data.shards import hf_revisions, list_shards
from echo_jax.errors import UserError
from echo_jax.model import Echo
from echo_jax.train.state import TrainState, count_params, create_train_state, example_inputs, learning_rate_schedule
from echo_jax.train.step import StepFunctions, sharded_abstract_state


class NonFiniteError(UserError, RuntimeError):
  """Raised when too many consecutive steps had a non-finite loss or gradient norm, the last of them `step`."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


@dataclasses.dataclass
class StepInfo:
  """What hooks see after a step: `step` steps are done and `state` is the state after them."""

  step: int
  state: TrainState
  trainer: Trainer


Hook = Callable[[StepInfo], None]


def load_pad_latent(path: str, latent_dim: int) -> np.ndarray:
  """The codec's encoding of silence [D] from a .npy file (local or gs://); zeros when no file is configured."""
  if not path:
    return np.zeros((latent_dim,), np.float32)
  with fsspec.open(path, "rb") as f:
    pad = np.load(f).astype(np.float32).reshape(-1)
  if pad.shape != (latent_dim,):
    raise ValueError(f"pad latent {path} has {pad.size} values, the model's latent_dim is {latent_dim}")
  if not np.isfinite(pad).all():  # it pads every short target: the losses would go NaN, blamed on the data
    raise ValueError(f"pad latent {path} holds NaN or infinite values: encode silence with the codec again")
  return pad


class Trainer:
  """Trains `config` into `workdir`, resuming from the newest complete checkpoint there if any.

  hooks: (every, fn) pairs; fn(StepInfo) runs on every process after each step that is a multiple of `every`.
  init_params: parameters to start a new run from instead of a random init (fresh optimizer state), e.g. imported
    weights, or a function returning them, called only when there is no checkpoint to resume (`--init_from`: a
    relaunch after a preemption resumes even when those weights are no longer there).
  force: train even when the compiled step needs more than 90% of the accelerator's memory.
  stop_requested: when set (e.g. by `install_sigterm_handler`, which the entry script installs before anything else),
    the loop saves a checkpoint and stops: after the current step in a single process, at the next step all processes
    agree on in a run joined by `jax.distributed.initialize` (see `_should_stop`).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               hooks: tuple[tuple[int, Hook], ...] = (), init_params: Any | Callable[[], Any] = None,
               force: bool = False,
               stop_requested: threading.Event | None = None):
    check_config(config)  # before anything: a bad value would otherwise fail the launch after its compile
    self.config = config
    self.force = force
    self.workdir = workdir = storage.expand_home(workdir)
    if is_local(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
      raise storage.RunDirectoryError(f"the run directory {workdir} is a file: give a directory, new or a run's")
    self.hooks = list(hooks)
    self.init_params = init_params
    self.is_main = jax.process_index() == 0
    self.model = Echo(model_config(config))
    self.mesh = sharding.make_mesh(config.mesh.to_dict())
    sharding.check_batch_size(self.mesh, config.train.batch_size)
    # The rows of every global batch that this process's devices hold, and the data streams that fill them: checked
    # here, before the compile, since a data.streams that does not fit them would fail the launch only after it.
    rows, batch = sharding.batch_sharding(self.mesh, 1), config.train.batch_size
    self.batch_rows = runtime.process_batch_rows(rows, batch)
    self.streams = batch_streams(batch, config.data.streams, self.batch_rows)  # first: its error names these rows
    # The streams that several processes read (their devices differ along the tensor axis only): compared at each
    # log step (`_align_shared_streams`).
    readers = collections.Counter(
        stream for process in range(jax.process_count())
        for stream in batch_streams(batch, config.data.streams, runtime.process_batch_rows(rows, batch, process)))
    self.shared_streams = sorted(stream for stream, count in readers.items() if count > 1)
    self.log = metrics.RunLog(workdir, enabled=self.is_main)  # after the checks: a refused config leaves no file
    self.stop_requested = stop_requested or threading.Event()
    self._skips: list[dict[str, Any]] = []
    self._skip_lock = threading.Lock()
    self._unconfirmed_saves: list[int] = []
    self._kept_steps: set[int] = set()  # the checkpoints on storage at the last confirmed save (or the launch)
    self._eval_memory_checked = False
    self._stop_forwarded = False
    self._claim: storage.RunDirectoryClaim | None = None  # taken by `_check_workdir`, held until `run` returns
    self._pad: np.ndarray | None = None
    self._step: int | None = None  # the step the run has reached, once restored: for the report of what stopped it

  # Run directory ---------------------------------------------------------------------------------------------

  def _on_skip(self, role: str, reason: str, key: str, shard: str, detail: str) -> None:
    # The role and the whole URL: the held-out data's skips were told from the training data's by nothing, and the
    # file name alone does not tell en/000.tar from de/000.tar.
    record = {"data": role, "reason": reason, "key": key, "shard": shard}
    if detail:
      record["detail"] = detail
    with self._skip_lock:
      self._skips.append(record)

  def _flush_skips(self, step: int) -> None:
    """Writes every process's skipped samples since the last flush (a small collective, same step everywhere)."""
    with self._skip_lock:
      local, self._skips = self._skips, []
    summary = {"records": local[:100], "dropped": max(0, len(local) - 100)}
    for process, records in enumerate(checkpoint.gather_per_process(summary)):
      for record in records["records"]:
        self.log.event("skipped_sample", step=step, process=process, **record)
      if records["dropped"]:
        self.log.event("skipped_sample", step=step, process=process, count=records["dropped"],
                       reason="more skips than logged individually")

  def _align_shared_streams(self, pipeline: StreamSet, step: int) -> None:
    """Moves the streams that several processes read to the furthest of their positions, where they differ (a
    shard that one of them could not download; see `StreamSet.align`); a small collective, same step everywhere."""
    positions = checkpoint.gather_per_process(pipeline.state())
    furthest = merge_stream_states(positions)
    for process, position in enumerate(positions):
      for stream, state in position["streams"].items():
        read_to, moved_to = read_position(state), read_position(furthest["streams"][stream])
        if read_to != moved_to:
          self.log.event("data_realigned", step=step, process=process, stream=int(stream),
                         read_to=list(read_to), moved_to=list(moved_to),
                         message="processes holding the same rows had read this stream to different places (a "
                                 "shard one of them could not download: see skipped_sample); moved on to the "
                                 "furthest (epoch, shard, sample), so that the rows agree from the next step")
    pipeline.align(furthest)

  # Setup ------------------------------------------------------------------------------------------------------

  def _shard_list(self, spec: str) -> list[str]:
    """The shards `spec` names, listed by process 0 and shared: a collective, so every process calls it in the same
    order, on its main thread."""
    # A listing per host would load gs:// or the Hub with one request per host, and hosts that listed at different
    # moments could disagree.
    listed, failure = None, None
    if self.is_main:
      try:
        listed = list_shards(spec)
      except Exception as error:  # noqa: BLE001 — shared, so that every host fails with it instead of waiting
        failure = error
    shared = checkpoint.gather_per_process(
        {"error": describe(failure)} if failure else {"shards": listed})[0]
    if failure is not None:
      raise failure
    if "error" in shared:
      raise RuntimeError(f"process 0 could not list the shards {spec!r}: {shared['error']}")
    return shared["shards"]

  def _pipeline(self, role: str, shards: list[str], seed: int, position: Any = None, *,
                whole_batch: bool = False) -> StreamSet:
    """This process's rows of every global batch of `shards` (a `_shard_list`): the data streams its devices hold
    (DESIGN §5), or with `whole_batch` every row, from one stream. Its reader threads start at once. Remote shards go
    through a cache directory of this run, `role` (train, eval) and process alone: several processes on one host
    may read the same streams (the held-out one; those of processes that differ only along the tensor axis), and
    caches sharing a directory would adopt and delete each other's files. The caches of this run and `role` that it
    does not use are deleted (`_remove_unused_caches`)."""
    config, data = self.config, self.config.data
    batch_size = config.train.batch_size
    num_streams, streams = (1, [0]) if whole_batch else (data.streams, self.streams)
    pipeline = StreamSet(
        shards=shards, batch_size=batch_size, num_streams=num_streams, streams=streams, state=position,
        cache_dir=self._cache_dir(role), shard_prefetch=data.shard_prefetch,
        stall_timeout=data.stall_timeout, retries=data.download_retries, latent_dim=config.model.latent_dim,
        max_text_len=data.max_text_len, max_frames=data.max_frames, max_ref_frames=data.max_ref_frames,
        pad_latent=self._pad_latent(), seed=seed, prefetch=data.prefetch,
        on_skip=functools.partial(self._on_skip, role))
    if data.cache_dir:
      self._remove_unused_caches(role, streams)
    return pipeline

  def _remove_unused_caches(self, role: str, streams: Sequence[int]) -> None:
    """Deletes the stream caches of this run and `role` on this machine that earlier launches left and this process
    does not use (`cache.remove_unclaimed`): those of other process indices (a launch with fewer processes, or with
    another host order) and of data streams it no longer reads, whose shards fetched ahead and partial downloads
    stayed on the disk for good. A cache in use by a live process (another of this launch on this host) holds its
    directory and is left alone; one that such a process has yet to claim may be deleted, and is made again."""
    own = self._cache_dir(role)  # normalised, as glob spells what it finds (data.cache_dir="a//")
    processes = glob.escape(self._cache_dir(role, process="")) + "*"
    used = {os.path.join(own, f"stream_{g}") for g in streams}
    removed = remove_unclaimed(path for path in sorted(glob.glob(os.path.join(processes, "stream_*")))
                               if path not in used)
    for process in sorted({os.path.dirname(path) for path in removed}):
      with contextlib.suppress(OSError):  # not empty: a cache of it is in use
        os.rmdir(process)
    if removed:
      logging.info("deleted %d shard caches of this run that earlier launches left and this one does not use: %s",
                   len(removed), ", ".join(removed))

  def _cache_dir(self, role: str, process: int | str | None = None) -> str | None:
    """The shard cache of this run, `role` and process (this one's, or `process`; see `_pipeline`); None when
    data.cache_dir is not set."""
    if not self.config.data.cache_dir:
      return None
    run = hashlib.sha256(self.workdir.encode("utf-8")).hexdigest()[:12]
    process = jax.process_index() if process is None else process
    return os.path.normpath(os.path.join(os.path.expanduser(self.config.data.cache_dir),
                                         f"{role}-{run}-process_{process}"))

  def _pad_latent(self) -> np.ndarray:
    """data.pad_latent, read once: by `_run` before the compile, so that a missing file fails the launch at once."""
    if self._pad is None:
      self._pad = load_pad_latent(self.config.data.pad_latent, self.config.model.latent_dim)
    return self._pad

  def _eval_batches(self, pipeline: StreamSet) -> _HeldOutBatches:
    """The held-out batches, read once from `pipeline` (a `_pipeline(whole_batch=True)`) and reused, so every
    evaluation sees the same data, with a digest of the whole batches this process read.

    Every process reads the whole batches through one stream and keeps its rows: a held-out set is small (often one
    shard), and split into the training's data.streams it would need as many shards; read this way it is also the
    same whatever data.streams and the process count are."""
    def own_rows(whole: np.ndarray) -> np.ndarray:
      return np.concatenate([whole[start:stop] for start, stop in self.batch_rows])

    digest, batches = hashlib.sha256(), []
    for _ in range(self.config.train.eval_batches):
      whole = next(pipeline)
      for name in sorted(whole):
        digest.update(name.encode("utf-8"))
        digest.update(np.ascontiguousarray(whole[name]).tobytes())
      batches.append(sharding.global_batch({name: own_rows(array) for name, array in whole.items()}, self.mesh))
    return _HeldOutBatches(batches, digest.hexdigest()[:16])

  def _held_out_agrees(self, held: _HeldOutBatches, step: int) -> bool:
    """Whether every process read the same whole held-out batches (a collective, at the launch's first evaluation).

    Each process reads them itself and keeps its rows: one that could not download a held-out shard the others read
    (given up after data.download_retries) goes on to the next and holds other samples, and the eval loss would mix
    rows of different batches, some samples twice and others never, with no sign of it. Evaluation is then off for
    this launch (`eval_skipped`); training goes on. So it is when a process could not read them at all (a single
    held-out shard it could not download, or that holds no usable sample)."""
    reports = checkpoint.gather_per_process({"digest": held.digest, "error": held.error})
    failed = [(process, report["error"]) for process, report in enumerate(reports) if report["error"]]
    if failed:
      message = (f"process {failed[0][0]} could not read the held-out batches ({failed[0][1]})"
                 + (f", nor could {len(failed) - 1} other processes" if len(failed) > 1 else "")
                 + "; evaluation is off until the next launch, which reads them again")
    elif len({report["digest"] for report in reports}) == 1:
      return True
    else:
      message = ("the processes read different held-out batches (digests by process: "
                 + ", ".join(report["digest"] for report in reports) + "): one could not read a held-out shard that "
                 "the others read (see the skipped_sample events and each host's log); evaluation is off until the "
                 "next launch, which reads them again")
    logging.warning(message)
    self.log.event("eval_skipped", step=step, message=message)
    return False

  def _check_workdir(self) -> None:
    """Before anything is saved: every process can do in the workdir what a run does there
    (`storage.check_run_directory`), claims it (`storage.RunDirectoryClaim`: no other trainer writes it), and sees
    what another one writes there. A collective.

    A workdir that is not one storage every host shares (a local path on a pod) would otherwise train: each host
    would write its part of every checkpoint where no other reads it, and no relaunch could restore one."""
    index, count = jax.process_index(), jax.process_count()

    def mark(process: int) -> str:
      return storage.join(self.workdir, f".storage_check.{process}")

    token, failure = uuid.uuid4().hex, None
    try:
      storage.check_run_directory(self.workdir, f".storage_check.{index}.ops")
      self._claim = storage.RunDirectoryClaim(self.workdir, index)
      if count > 1:
        try:
          storage.write_bytes(mark(index), token.encode())
        except Exception as error:
          raise storage.RunDirectoryError(f"cannot write {mark(index)} ({describe(error)})") from error
    except storage.RunDirectoryError as error:  # shared, so that every host fails with it instead of waiting
      failure = error
    reports = checkpoint.gather_per_process({"token": token, "error": str(failure) if failure else None,
                                             "in_use": isinstance(failure, storage.RunDirectoryInUseError)})
    if failure is not None:
      raise failure
    refused = [(i, report) for i, report in enumerate(reports) if report["error"]]
    if refused:
      storage.remove_if_possible(mark(index))
      first, report = refused[0]
      error_class = storage.RunDirectoryInUseError if report["in_use"] else storage.RunDirectoryError
      raise error_class(f"process {first} cannot use the run directory: {report['error']}")
    if self._claim.took_over:
      logging.warning("took over the lease of the run directory from a trainer that no longer renews it (%s)",
                      self._claim.took_over)
      self.log.event("lease_taken_over", holder=self._claim.took_over)
    if count == 1:
      return
    # Each reads the mark of the next: storage that some hosts share and others do not breaks the ring somewhere.
    after = (index + 1) % count
    try:
      read = storage.read_bytes(mark(after)).decode()
      view = "sees it" if read == reports[after]["token"] else "sees another launch's copy of it"
    except FileNotFoundError:
      view = "does not see it"
    except Exception as error:  # noqa: BLE001 — shared, as above
      view = f"cannot read it ({describe(error)})"
    views = checkpoint.gather_per_process(view)
    storage.remove_if_possible(mark(index))
    blind = [i for i, seen in enumerate(views) if seen != "sees it"]
    if blind:
      first = blind[0]
      raise storage.RunDirectoryError(
          f"the workdir {self.workdir} is not one storage every host shares: process {first} {views[first]}, the "
          f"file that process {(first + 1) % count} wrote there ({len(blind)} of {count} processes miss their "
          "neighbour's). Each host would save its part of every checkpoint where no other reads it, and no relaunch "
          "could restore one: on a pod the workdir must be on gs:// (or a filesystem every host mounts)")

  def _resume_step(self, ckpt: checkpoint.Checkpointer) -> int | None:
    """The step every process resumes from (None: a new run), from the checkpoints all of them see. A collective.

    Processes that see different checkpoints would restore different steps and mix them silently: their workdir
    is not one shared storage, or another trainer is writing it. That is refused."""
    seen = checkpoint.gather_per_process(ckpt.all_steps())
    if any(steps != seen[0] for steps in seen):
      listed = "; ".join(f"process {i}: {steps[-3:] or 'none'}" for i, steps in enumerate(seen))
      raise RuntimeError(f"the processes see different checkpoints in {ckpt.directory} ({listed}, newest last). "
                         "The workdir must be storage every host shares (gs:// on a pod), written by this run alone "
                         "(launch.sh stops stale trainers)")
    return max(seen[0]) if seen[0] else None

  def _initial_state(self, abstract_state: TrainState, ckpt: checkpoint.Checkpointer, latest: int | None,
                     train_shards: list[str]) -> tuple[TrainState, Any, dict[str, Any]]:
    """(state, this process's data position, the checkpoint's metadata): restored, imported or freshly initialised
    (no position, empty metadata), with the shapes and shardings of `abstract_state` (`sharded_abstract_state`);
    restored from step `latest` (a `_resume_step`) unless it is None. A position that cannot continue over
    `train_shards` (other streams, shards or seed) is dropped, with an event: the data then goes on from the start of
    the epoch after the furthest one it had begun (`fresh_position`)."""
    for name in ckpt.incomplete:
      self.log.event("incomplete_checkpoint_ignored", directory=name,
                     message="an interrupted save was found and ignored; resuming from the last complete one")
    if latest is not None:
      restore_start = time.time()
      state, positions, meta = ckpt.restore(latest, abstract_state)
      restore_seconds = time.time() - restore_start
      # Every process's streams, so that any layout whose process count divides data.streams picks up its own.
      position = merge_stream_states([positions[name] for name in sorted(positions)])
      streams = self.config.data.streams
      if position is None or len(position["streams"]) != streams:
        why = f"the checkpoint's data position is not one of data.streams={streams} streams"
      else:
        # E.g. shards added under the glob while a dataset is still being uploaded.
        why = position_mismatch(position, train_shards, self.config.seed)
      if why:
        position = fresh_position(train_shards, self.config.seed, streams, after=position)
        epoch = position["streams"]["0"]["epoch"]
        self.log.event("data_position_reset", step=latest,
                       message=f"{why}; the data goes on from the start of epoch {epoch}, a shuffle this run has "
                               "not read")
      self.log.event("checkpoint_restored", step=latest, seconds=round(restore_seconds, 3))
      return state, position, meta
    state_shardings = sharding.shardings_of(abstract_state)
    init = jax.jit(lambda key: create_train_state(self.model, key, self.config), out_shardings=state_shardings)
    state = init(jax.random.key(self.config.seed))
    if self.init_params is not None:
      state = state.replace(params=place_host_arrays(self.init_params, state_shardings.params))
    return state, None, {}

  def _peak_flops(self, meta: dict[str, Any]) -> float:
    """Peak FLOP/s of all devices together, for MFU.

    On CPU, unless the config gives it, the peak is a matmul measured at start: 0.6 s, a tenth of a warm restart. A
    resumed run on as many CPU devices takes the peak its checkpoint recorded instead, so that it starts sooner and
    its MFU stays comparable with the steps before the restart.
    """
    if (jax.devices()[0].platform == "cpu" and not self.config.train.cpu_peak_flops
        and meta.get("platform") == "cpu" and meta.get("devices") == jax.device_count() and meta.get("peak_flops")):
      return float(meta["peak_flops"])
    return metrics.peak_flops_per_device(self.config.train.cpu_peak_flops) * jax.device_count()

  # The loop ---------------------------------------------------------------------------------------------------

  def run(self) -> TrainState:
    """Trains to `train.steps` (or until a stop is requested); returns the final state. An error that stops the run
    is also written to its events (for the dashboard), once, and by every process to a file of its own
    (`metrics.record_process_error`). A launch that does not reach its first step within
    `train.setup_timeout` exits like a stuck step (`runtime.HangWatchdog`)."""
    self._setup_watchdog = runtime.HangWatchdog(self.config.train.setup_timeout,
                                                "the launch did not reach its first step (train.setup_timeout)",
                                                self._report_stuck)
    try:
      return self._run()
    except Exception as error:
      step = getattr(error, "step", self._step)  # an error's own step (the checkpoint it failed to restore...)
      if isinstance(error, checkpoint.CheckpointRestoreError):
        self.log.event("checkpoint_restore_failed", step=step, message=str(error))
      elif not isinstance(error, _LOGGED_ERRORS):
        self.log.event("error", step=step, message=f"the run stopped: {describe(error)}")
      if not isinstance(error, storage.RunDirectoryInUseError):  # the directory is another trainer's: left alone
        metrics.record_process_error(self.workdir, error, step)
      raise
    finally:
      self._setup_watchdog.stop()
      self.log.close()
      if self._claim is not None:
        self._claim.release()

  def _report_stuck(self, message: str) -> None:
    """What a process ended by a hang watchdog leaves of it in the run directory, as an error that stops the run does:
    the event (process 0) and this process's error file. The watchdog then exits the process without closing the
    log, so it is closed here: on gs:// its lines are otherwise pending until the next sync, which never comes."""
    self.log.event("error", step=self._step, message=f"the run stopped: {message}")
    self.log.close()
    metrics.record_process_error(self.workdir, runtime.RunStuckError(message), self._step)

  def _run(self) -> TrainState:
    if jax.distributed.is_initialized():
      self._join_preemption_sync()
    config, train = self.config, self.config.train
    global_shapes = example_inputs(config, train.batch_size)
    # After a launch that compiled the train step, the state's shapes and shardings are stored with it: no trace.
    abstract_state = (StepFunctions.cached_abstract_state(config, self.mesh, global_shapes)
                      or sharded_abstract_state(self.model, config, self.mesh))
    # Listed and checked first, so that a shard spec naming nothing, too few shards for data.streams or a missing
    # pad latent fail the launch at once, not after the compile.
    train_shards = self._shard_list(config.data.train_shards)
    check_shards(train_shards, config.data.streams, self._cache_dir("train"))
    evaluates = bool(config.data.eval_shards) and train.eval_every > 0 and train.eval_batches > 0
    eval_shards = self._shard_list(config.data.eval_shards) if evaluates else []
    if evaluates:
      check_shards(eval_shards, 1, self._cache_dir("eval"))
    self._pad_latent()
    held_out = _HeldOut(functools.partial(self._pipeline, "eval", eval_shards, seed=0, whole_batch=True)
                        if evaluates else None, self._eval_batches)
    self._check_workdir()  # before the checkpoint manager, which makes directories there
    # Not before: the events of a workdir in use are another trainer's. The commits are those the URLs name.
    for spec, shards in ((config.data.train_shards, train_shards), (config.data.eval_shards, eval_shards)):
      if revisions := hf_revisions(shards):
        self.log.event("shards_listed", spec=spec, shards=len(shards), revisions=revisions)
    ckpt = checkpoint.Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=train.keep_checkpoints,
                                   keep_period=train.keep_period, compression=train.ckpt_compression,
                                   restore_gb=checkpoint.restore_budget_gb(abstract_state, train.ckpt_restore_gb))
    pipeline = None
    try:
      resume_step = self._resume_step(ckpt)
      if resume_step is not None:
        ckpt.check_state(resume_step, abstract_state)
        if self.init_params is not None:
          self.log.event("init_params_ignored", step=resume_step,
                         message="the run resumes from its checkpoint; init_from applies to a new run only")
          self.init_params = None
      elif callable(self.init_params):
        self.init_params = self.init_params()  # before the compile: a wrong path fails the launch in seconds
      if resume_step is not None and resume_step >= train.steps:  # no compile: on a pod it takes minutes
        message = (f"the run is at step {resume_step} already and train.steps={train.steps}: nothing to train; "
                   "raise --config.train.steps to go on (the learning-rate schedule, cosine to zero at train.steps, "
                   "then stretches to the new total: the rate rises again; config_changed records by how much)")
        logging.warning(message)
        self.log.event("nothing_to_train", step=resume_step, message=message)
        state = ckpt.restore(resume_step, abstract_state)[0]
        held_out.close()
        ckpt.close()
        return state
      # A new run evaluates before its first step: it reads the held-out batches while the train step compiles. A
      # restart's first evaluation is eval_every steps away: it reads them once its first step is logged (as it
      # compiles the eval step then), so that its first step waits neither for them nor for the CPU and the bandwidth
      # they take.
      if evaluates and resume_step is None:
        held_out.start()
      steps, compile_seconds, state, start_step, meta, pipeline = self._compile_and_restore(
          global_shapes, abstract_state, ckpt, resume_step, train_shards)
      self._kept_steps = set(ckpt.all_steps())
    except BaseException:
      if pipeline is not None:  # opened, then the listing of the checkpoints failed: its reader threads would stay
        pipeline.close()
      held_out.close()
      ckpt.close_after_failure()  # a launch failing here must not exit under the manager's clean-up thread
      raise
    progress = tqdm(total=train.steps, initial=start_step, desc="train", disable=not self.is_main,
                    dynamic_ncols=True)
    self._setup_watchdog.stop()
    watchdog = runtime.HangWatchdog(train.hang_timeout, "no training step finished (train.hang_timeout)",
                                    self._report_stuck)
    try:
      self._record_config(resume_step)
      samples_seen = int(meta.get("samples_seen", start_step * train.batch_size))
      cfg = self.model.cfg
      flops_per_step = metrics.train_flops_per_step(cfg, train.batch_size, config.data.max_frames,
                                                    config.data.max_text_len, config.data.max_ref_frames)
      peak = self._peak_flops(meta)
      self.log.event("start", step=start_step, params=count_params(abstract_state.params),
                     devices=jax.device_count(), processes=jax.process_count(), mesh=dict(self.mesh.shape),
                     compile_seconds=round(compile_seconds, 2), flops_per_step=flops_per_step, peak_flops=peak)
      # Step 0's: the baseline that later evaluations are compared with. A stop's: skipped by the launch that stopped
      # there (see below), evaluated now on the state it saved, which gives what that launch would have.
      if evaluates and (start_step == 0 or meta.get("eval_pending")):
        self._evaluate(steps, state, held_out.result(), start_step)
      consecutive_nonfinite = 0
      pending = None  # (step, device metrics, host timings) of the step whose metrics are not yet logged
      eval_started = False  # the eval step's background compile and the held-out read
      # When the previous step finished (seen when its metrics were fetched); the first step is timed from here.
      finished = time.time()
      # Seconds spent waiting for data since then: the wait for batch N+1 falls in step N's time, not N+1's.
      waited = 0.0
      step = start_step
      while step < train.steps:
        watchdog.beat()
        wait_start = time.time()
        batch = sharding.global_batch(next(pipeline), self.mesh)
        waited += time.time() - wait_start
        state, step_metrics = steps.train(state, batch)
        step += 1
        self._step = step
        samples_seen += train.batch_size
        if pending is not None:  # step N+1 is queued: now fetching step N's metrics costs the device nothing
          consecutive_nonfinite, finished = self._log_step(*pending, waited, consecutive_nonfinite, progress)
          self._stop_if_diverged(pending[0], consecutive_nonfinite)
          waited = 0.0
          if evaluates and not eval_started:
            # A restart's first evaluation is eval_every steps away: its eval step compiles and its held-out batches
            # are read beside the training once the first step is logged, so that the first step waits neither for
            # them nor for the GIL they hold.
            steps.compile_eval_in_background()
            held_out.start()
            eval_started = True
          if evaluates and not self._eval_memory_checked and steps.eval_ready:
            # Checked once its compilation ends, not at the first evaluation (eval_every steps of training away).
            self._check_eval_memory(steps)
        pending = (step, step_metrics, {"since": finished, "samples_seen": samples_seen, "flops": flops_per_step,
                                        "peak": peak})
        stop = self._should_stop(step - start_step)
        # A stop before the last step (a preemption, with a grace period before the kill) saves at once: this step's
        # evaluation and hooks (samples) would delay the save, and the run exits after it. Its evaluation is left to
        # the relaunch (`eval_pending` in the checkpoint's metadata).
        stopping_short = stop and step < train.steps
        eval_due = evaluates and step % train.eval_every == 0
        if eval_due and not stopping_short:
          self._evaluate(steps, state, held_out.result(), step)
        final = stop or step == train.steps
        logs, saves = step % train.log_every == 0 or final, final or step % train.ckpt_every == 0
        if logs or saves:
          self._check_claim()
        if logs:
          self._flush_skips(step)
          if self.shared_streams:
            self._align_shared_streams(pipeline, step)
          self._confirm_saves(ckpt)
        if saves:
          # Orbax's save waits for the save before it anyway; waited for here, that one's failure is reported as such
          # (checkpoint_failed) and not raised raw from Orbax's save.
          self._confirm_saves(ckpt, wait=True)
          # This step's metrics, and every line before them, reach the run log before the checkpoint: a relaunch
          # resumes after it and never logs these steps again, and on gs:// a process killed once its save was done
          # (a preemption's grace running out) lost the lines still waiting for their sync.
          consecutive_nonfinite, finished = self._log_step(*pending, waited, consecutive_nonfinite, progress)
          pending, waited = None, 0.0
          self.log.flush()  # a divergence at this step is raised once it is saved: the updates skipped kept it finite
          positions = checkpoint.gather_per_process(pipeline.state())
          ckpt.save(step, state, positions, {"samples_seen": samples_seen, "process_count": jax.process_count(),
                                             "platform": jax.devices()[0].platform, "devices": jax.device_count(),
                                             "peak_flops": peak, "eval_pending": eval_due and stopping_short})
          self._unconfirmed_saves.append(step)
          self._stop_if_diverged(step, consecutive_nonfinite)
        for every, hook in self.hooks:
          if step % every == 0 and not stopping_short:
            hook(StepInfo(step=step, state=state, trainer=self))
        if stop:
          self.log.event("stopped", step=step,
                         message="stop requested (SIGTERM or Ctrl-C); saving a checkpoint, then exiting")
          break
      if pending is not None:
        consecutive_nonfinite, _ = self._log_step(*pending, waited, consecutive_nonfinite, progress)
        self._stop_if_diverged(pending[0], consecutive_nonfinite)
      if step == train.steps and jax.distributed.is_initialized():
        _ignore_late_sigterm()
    finally:
      watchdog.beat()  # the closes and the last save's wait get the whole timeout too
      try:
        # The checkpoints first: a failure to close the data (a cache file that cannot be deleted) must not skip the
        # wait for the last save, which a multi-process run's exit on that error would then cut short.
        try:
          self._confirm_saves(ckpt, wait=True)
        finally:
          ckpt.close()
      finally:
        try:
          progress.close()
          pipeline.close()
          held_out.close()  # a run ending before its first evaluation
        finally:
          watchdog.stop()
    if step < train.steps:
      # Once its checkpoint is saved, on every process: the process exits 0 as a finished run does, and launch.sh
      # tells them apart by this line.
      print(f"stopped at step {step} of {train.steps}; relaunch to resume", flush=True)
    return state

  def _record_config(self, resume_step: int | None) -> None:
    """Process 0 writes the launch's config to config.json, and what changed since the last launch to the events.

    Only once the state is restored and the step compiled and within memory: a launch refused for another model, a
    step over the memory limit or a checkpoint that cannot be read must not overwrite the record of the config the
    run's checkpoints were trained with (its relaunch with that config then reported a change that never trained)."""
    if not self.is_main:
      return
    config, train = self.config, self.config.train
    changes = config_changes(config, self.workdir)
    if changes:
      described = "; ".join(f"{key} {before!r} -> {now!r}" for key, (before, now) in changes.items())
      lr = _learning_rates_at(resume_step or 0, train, changes)
      if lr:
        described += (f". The learning rate at step {resume_step or 0} goes from {lr[0]:.3g} to {lr[1]:.3g}: "
                      "the schedule (warmup, then cosine to zero at train.steps) follows the new values")
      logging.warning("config changed since the run's last launch: %s", described)
      self.log.event("config_changed", step=resume_step or 0, changes=changes, **({"lr_at_step": lr} if lr else {}))
    write_config_json(config, self.workdir)

  def _compile_and_restore(self, global_shapes: dict[str, jax.ShapeDtypeStruct], abstract_state: TrainState,
                           ckpt: checkpoint.Checkpointer, resume_step: int | None, train_shards: list[str],
                           ) -> tuple[StepFunctions, float, TrainState, int, dict[str, Any], StreamSet]:
    """(the compiled (or loaded) steps, the seconds that took, the state restored from `resume_step` or initialised,
    its step, its checkpoint's metadata, the training data opened at its position), the steps' memory checked.

    While the train step compiles (or loads), threads restore (or initialise) the state and open the training data at
    the restored position: a launch waits for the longer of the two, not for their sum (on a pod the first shards'
    downloads, the restore and the compile take seconds to minutes each). The threads do the same work on every
    process and none of it talks to other processes. With train.restore_beside_compile off, a restore (and so the
    data, which opens at its position) waits for the compile or load instead."""
    config = self.config
    with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="initial_state") as background:

      def start_initial() -> tuple[concurrent.futures.Future, concurrent.futures.Future]:
        initial = background.submit(self._initial_state, abstract_state, ckpt, resume_step, train_shards)
        return initial, background.submit(
            lambda: self._pipeline("train", train_shards, config.seed, initial.result()[1]))

      beside = config.train.restore_beside_compile or resume_step is None
      initial, opened = start_initial() if beside else (None, None)
      try:
        compile_start = time.time()
        # Loaded instead when an earlier launch compiled it; the load leaves the GIL to the threads.
        steps = StepFunctions.compile(self.model, config, self.mesh, global_shapes, evaluate=False,
                                      abstract_state=abstract_state)
        compile_seconds = time.time() - compile_start
        # Before any step, so that an OOM costs no training; a refusal still waits for the threads to finish.
        aot.check_memory(steps.train, jax.local_devices(), force=self.force)
        if not beside:
          initial, opened = start_initial()
        state, _, meta = initial.result()
        start_step = int(jax.device_get(state.step))
        self._step = start_step
      except BaseException:
        if opened is not None:
          opened.add_done_callback(_close_pipeline)  # its reader threads would outlive the failed launch
        raise
      return steps, compile_seconds, state, start_step, meta, opened.result()

  def _should_stop(self, steps_run: int) -> bool:
    """True when this launch should save and stop after its `steps_run`-th step: in a run joined by
    `jax.distributed.initialize`, on every process at one step.

    Joined, SIGTERM is JAX's preemption notice (its notifier takes the signal over from `install_sigterm_handler`):
    the notified processes agree, through the coordination service and without a device collective, on the step
    after the furthest one's, and `reached_preemption_sync_point` is true there on each: a stop costs a step or two,
    and until a notice no step waits on the other hosts for it. Its counter is the steps of this launch, not the
    training step: a notice during start-up (restore, compile) finds every process at 0, so the sync point is the
    first step; counted by training step it would be step 1, which a resumed run never reaches.
    """
    if not jax.distributed.is_initialized():
      return self.stop_requested.is_set()
    self._forward_stop()
    if multihost_utils.reached_preemption_sync_point(steps_run):
      _preemption_sync_reached.set()
      return True
    return False

  def _join_preemption_sync(self) -> None:
    """Before a joined run: fails now, not at the first step, where JAX's preemption service is off; refuses a
    second run in a process whose sync point was reached (JAX sets it once per process: the run would stop there
    again, without a notice, and ignore a new one); hands on a stop that came while the hosts joined, so that the
    processes agree on it while this launch compiles."""
    multihost_utils.reached_preemption_sync_point(0)  # raises JAX's own error when the service is off
    if _preemption_sync_reached.is_set():
      raise RuntimeError("this process already stopped at JAX's preemption sync point, which it sets once per "
                         "process; start a new process (relaunch) to train on")
    self._forward_stop()

  def _forward_stop(self) -> None:
    """Makes `stop_requested` (set by a SIGTERM that came while the hosts joined, caught by our handler before JAX's
    took over, or by code) this process's preemption notice, so that the others stop with it."""
    if self.stop_requested.is_set() and not self._stop_forwarded:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which now owns the signal
      self._stop_forwarded = True

  def _check_claim(self) -> None:
    """At each log step and before each save, on every process: a trainer whose remote run directory another launch
    has taken over (see `storage.RunDirectoryClaim`) stops, without saving over that launch's checkpoints or
    writing on into its run log (until the next save, which can be thousands of steps away). A collective, but for a
    local workdir (the same on every host): its claim is a lock the kernel holds, which no one takes over."""
    if is_local(self.workdir):
      return
    lost = [report for report in checkpoint.gather_per_process(self._claim.lost if self._claim else None) if report]
    if lost:
      raise storage.RunDirectoryInUseError(f"{lost[0]}: this trainer stopped without saving; the other one goes on")

  def _confirm_saves(self, ckpt: checkpoint.Checkpointer, wait: bool = False) -> None:
    """Writes `checkpoint_saved` for the saves that Orbax has finished in the background (all of them, waiting,
    with `wait`). A save that failed (a full disk, lost storage) stops the run now with `checkpoint_failed`, not at
    the next save, ckpt_every steps of accelerator time later."""
    if not self._unconfirmed_saves or (not wait and ckpt.manager.is_saving_in_progress()):
      return
    steps, self._unconfirmed_saves = self._unconfirmed_saves, []
    try:
      # With nothing in flight this returns at once; it is what raises the error of a failed background save.
      ckpt.wait()
    except Exception as error:
      try:
        newest = ckpt.newest_on_storage()
        resume = f"The newest complete checkpoint is step {newest}" if newest is not None else \
            "There is no complete checkpoint"
      except Exception as listing_error:  # noqa: BLE001 — the storage may be what failed
        resume = f"Which checkpoints are complete is not known (listing them failed too: {describe(listing_error)})"
      message = (f"saving checkpoint step {steps} to {ckpt.directory} failed ({describe(error)}). {resume}; free "
                 "space there (or fix the storage), then relaunch to resume from it")
      self.log.event("checkpoint_failed", steps=steps, message=message)
      raise checkpoint.CheckpointSaveError(message) from error
    saved = set(ckpt.all_steps())
    for step in steps:
      if step in saved:
        self.log.event("checkpoint_saved", step=step)
    deleted = sorted(self._kept_steps - saved)
    if deleted:
      # Orbax applies this launch's policy to every step there, those an earlier launch's keep_period kept included.
      train = self.config.train
      self.log.event("checkpoints_deleted", steps=deleted,
                     message=f"deleted by the keep policy (train.keep_checkpoints={train.keep_checkpoints}, "
                             f"train.keep_period={train.keep_period})")
    self._kept_steps = saved

  def _log_step(self, step: int, device_metrics: dict[str, jax.Array], timing: dict[str, float], data_wait: float,
                consecutive_nonfinite: int, progress: tqdm) -> tuple[int, float]:
    """Fetches and logs the metrics of `step`; returns the count of consecutive non-finite steps and when `step`
    finished. Its time is from when the step before it finished (`timing["since"]`) to when its own metrics are
    ready: not between two dispatches, which for the first step of a launch measures only the dispatch.
    `data_wait` is the seconds the loop waited for data within that time."""
    values = {name: float(np.asarray(value)) for name, value in jax.device_get(device_metrics).items()}
    finished = time.time()
    finite = bool(values.pop("finite"))
    consecutive_nonfinite = 0 if finite else consecutive_nonfinite + 1
    if not finite:
      self.log.event("nonfinite", step=step, loss=values["loss"], grad_norm=values["grad_norm"],
                     consecutive=consecutive_nonfinite, message="update skipped: non-finite loss or gradient norm")
    progress.update(step - progress.n)
    progress.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
    train = self.config.train
    if step % train.log_every == 0 or step == train.steps or not finite:
      step_time = max(finished - timing["since"], 1e-9)
      self.log.metrics.write({
          "step": step, "time": time.time(), **values, "samples_seen": timing["samples_seen"],
          "samples_per_sec": train.batch_size / step_time, "steps_per_sec": 1.0 / step_time,
          "step_time": step_time, "data_wait": data_wait / step_time,
          "mfu": timing["flops"] / step_time / timing["peak"], "total_steps": train.steps,
      })
    return consecutive_nonfinite, finished

  def _stop_if_diverged(self, step: int, consecutive_nonfinite: int) -> None:
    """Raises NonFiniteError once `consecutive_nonfinite` steps in a row, the last of them `step`, had a non-finite
    loss or gradient norm (train.max_nonfinite)."""
    if consecutive_nonfinite >= self.config.train.max_nonfinite:
      saved = (f"the checkpoints in {os.path.join(self.workdir, 'checkpoints')} hold finite weights"
               if self._kept_steps else "no checkpoint was saved yet")
      message = (f"stopping: {consecutive_nonfinite} consecutive steps had a non-finite loss or gradient norm "
                 f"(last at step {step}); parameters were not updated by them, and {saved}. Check the data "
                 "(events.jsonl) or lower train.lr, then restart to resume from the last checkpoint.")
      self.log.event("error", step=step, message=message)
      raise NonFiniteError(step, message)

  def _check_eval_memory(self, steps: StepFunctions) -> Any:
    """The compiled eval step, checked against device memory (once) as the train step is before the first step; the
    optimizer state stays on the devices beside it. A new run checks it before its step-0 evaluation, a restart once
    its background compilation has ended."""
    eval_step = steps.eval_step()
    if not self._eval_memory_checked:
      aot.check_memory(eval_step, jax.local_devices(), force=self.force, name="eval step",
                       resident=sharding.bytes_per_device(steps.abstract_state.opt_state))
      self._eval_memory_checked = True
    return eval_step

  def _evaluate(self, steps: StepFunctions, state: TrainState, held: _HeldOutBatches, step: int) -> None:
    if held.agreed is None:
      held.agreed = self._held_out_agrees(held, step)
    if not held.agreed:
      return
    eval_step = self._check_eval_memory(steps)
    totals: dict[str, float] = {}
    for index, batch in enumerate(held.batches):
      losses = jax.device_get(eval_step(state.params, batch, jax.random.key(index)))
      for name, value in losses.items():
        totals[name] = totals.get(name, 0.0) + float(value) / len(held.batches)
    self.log.metrics.write({"step": step, "time": time.time(), **totals})


def _learning_rates_at(step: int, train: ml_collections.ConfigDict, changes: dict[str, list]) -> list[float] | None:
  """[before, now]: the learning rate at `step` under the schedule of the run's last launch and under `train`'s,
  when `changes` (a `config_changes`) touches the schedule; else None. A relaunch with more train.steps stretches
  the cosine: a run near its end goes on at a far higher rate."""
  fields = {key.removeprefix("train."): before for key, (before, _) in changes.items()
            if key in ("train.steps", "train.lr", "train.warmup_frac")}
  if not fields or any(value is None for value in fields.values()):
    return None
  before = ml_collections.ConfigDict({**train.to_dict(), **fields})
  return [float(learning_rate_schedule(before)(step)), float(learning_rate_schedule(train)(step))]


# Set once a joined run of this process has reached JAX's preemption sync point (see `_join_preemption_sync`).
_preemption_sync_reached = threading.Event()

def place_host_arrays(arrays: Any, shardings: Any) -> Any:
  """Global arrays with `shardings` from the same host (numpy) arrays on every process, each process copying only the
  shards its devices hold. (`jax.device_put` of a numpy array onto a sharding over several processes first checks
  that every process holds the same value: a collective per array that gathers the whole array onto every device,
  P times its size in memory the launch's check does not count — out of memory on a large slice for a large model.)"""
  return jax.tree.map(lambda array, where: jax.make_array_from_callback(array.shape, where, array.__getitem__),
                      arrays, shardings)


# Errors not written to the run's events: logged there already, or (in use) the run log is another trainer's.
_LOGGED_ERRORS = (checkpoint.CheckpointSaveError, NonFiniteError, storage.RunDirectoryInUseError)


@dataclasses.dataclass
class _HeldOutBatches:
  batches: list[dict[str, jax.Array]]  # this process's rows of each held-out batch
  digest: str  # of the whole batches it read, compared across processes at the first evaluation
  agreed: bool | None = None  # whether every process's digest was the same; None until compared
  error: str | None = None  # why this process could not read them (then `batches` is empty)


class _HeldOut:
  """The held-out batches, `read(open_pipeline())` once in a thread of its own from `start` on. `close` ends a read
  still under way: Python's exit waits for that thread, and a launch that fails, or a run that ends before its first
  evaluation, must not wait there for the held-out shards' downloads (up to data.download_retries stalls each)."""

  def __init__(self, open_pipeline: Callable[[], StreamSet] | None, read: Callable[[StreamSet], Any]):
    self._open, self._read = open_pipeline, read
    self._lock = threading.Lock()
    self._pipeline: StreamSet | None = None
    self._closed = False
    self._reading = InBackground("held_out", self._open_and_read)
    self._failed: _HeldOutBatches | None = None

  def _open_and_read(self) -> Any:
    pipeline = self._open()
    with self._lock:
      closed, self._pipeline = self._closed, pipeline
    with pipeline:
      if closed:
        raise RuntimeError("the held-out read was stopped before it began")
      return self._read(pipeline)

  def start(self) -> None:
    self._reading.start()

  def result(self) -> _HeldOutBatches:
    """The batches read, or none and why when the read failed (the same object at every call): held-out data that
    cannot be read turns evaluation off (`Trainer._held_out_agrees`) and must not stop the training."""
    if self._failed is not None:
      return self._failed
    try:
      return self._reading.result()
    except Exception as error:  # noqa: BLE001 — reported as eval_skipped at the first evaluation
      self._failed = _HeldOutBatches([], "", error=describe(error))
      return self._failed

  def close(self) -> None:
    """Ends the read; an error in doing so is logged, not raised: it must not hide the error of a failed launch, nor
    keep the checkpoints from being closed."""
    with self._lock:
      self._closed, pipeline = True, self._pipeline
    if pipeline is not None:
      try:
        pipeline.close()
      except Exception as error:  # noqa: BLE001 — see the docstring
        logging.warning("closing the held-out data failed: %s", describe(error))


def _close_pipeline(opened: concurrent.futures.Future) -> None:
  if not opened.cancelled() and opened.exception() is None:
    opened.result().close()


def _ignore_late_sigterm() -> None:
  """After the last step of a joined run a SIGTERM has nothing left to stop, but JAX's preemption notifier would still
  act on it: its sync barrier waits for every process, and one that has already begun to exit never comes, so both
  would wait out the barrier's 3 minutes before exiting. This handler, in the notifier's place, only reports it."""
  if threading.current_thread() is not threading.main_thread():
    return  # signal handlers are the main thread's to set; a Trainer run elsewhere keeps the notifier's

  def on_sigterm(signum: int, frame: Any) -> None:
    print("SIGTERM after the last step: the run is complete; exiting once its last checkpoint is written",
          flush=True)

  signal.signal(signal.SIGTERM, on_sigterm)


def install_sigterm_handler(stop: threading.Event) -> None:
  """SIGTERM (TPU maintenance, preemption, launch.sh stopping a run) sets `stop`: the Trainer given it saves a
  checkpoint and returns (the process exits 0). A second SIGTERM ends the process at once, as by default, for a run
  that cannot reach its stop.

  Install it before `runtime.initialize`: once the hosts have joined, JAX's preemption notifier (which
  `jax.distributed.initialize` starts, and which replaces this handler) receives SIGTERM, the Trainer stops at the
  step the processes agree on, and a second SIGTERM does nothing (launch.sh then sends SIGKILL). This handler covers
  the wait for the other hosts to join. Installed after, it would hide SIGTERM from JAX's notifier and the other
  processes would never learn of the stop: refused. (A process blocked in a collective with a dead peer runs no
  signal handler at all: only SIGKILL ends it, which launch.sh sends.)
  """
  if jax.distributed.is_initialized():
    raise RuntimeError("install_sigterm_handler must run before jax.distributed.initialize (runtime.initialize): "
                       "after it, SIGTERM is JAX's preemption notice, which the Trainer follows")

  def on_sigterm(signum: int, frame: Any) -> None:
    if stop.is_set():
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGTERM)
    stop.set()

  signal.signal(signal.SIGTERM, on_sigterm)


def install_sigint_handler(stop: threading.Event) -> None:
  """Ctrl-C on a run of one process that has not joined a distributed runtime: the first sets `stop`, as SIGTERM
  does (the Trainer saves a checkpoint after its current step, or its first, and returns), and says so; a second
  interrupts at once (KeyboardInterrupt, nothing saved). Before, Ctrl-C lost every step since the last checkpoint.
  A joined run keeps Python's default: only JAX's preemption notice makes its hosts agree on a step to stop at
  (launch.sh turns Ctrl-C into SIGTERM for every host)."""
  if jax.distributed.is_initialized():
    raise RuntimeError("install_sigint_handler is for runs of one process that have not joined a distributed runtime")

  def on_sigint(signum: int, frame: Any) -> None:
    if stop.is_set():
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    stop.set()
    print("\nCtrl-C: a checkpoint is saved after the step in progress, then the run stops; Ctrl-C again stops at "
          "once, without it", file=sys.stderr, flush=True)

  signal.signal(signal.SIGINT, on_sigint)
