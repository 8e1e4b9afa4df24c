"""Run-directory writers (metrics.jsonl, events.jsonl), analytic FLOPs, device peaks and MFU (DESIGN §7).

JSONL is always written, one object per line: locally flushed at once (the dashboard and `tail -f` see it then), on
gs:// appended every few seconds.
Only process 0 writes them; other processes get writers that drop everything. An error that stops a process is
written by that process, whichever it is, to a file of its own (`record_process_error`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from echo_jax import storage
from echo_jax.background import finishes_within
from echo_jax.data.cache import describe, is_local
from echo_jax.model import EchoConfig

# Dense bf16 peak per JAX device. A v4 chip in megacore mode is one device.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,  # before the generic "NVIDIA H100": kinds match by prefix
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def _to_json(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "item"):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep it visible instead of failing the write
  return value


def _ends_a_line(path: str) -> bool:
  """Whether the local file `path` is empty or ends with a newline."""
  with open(path, "rb") as f:
    if f.seek(0, os.SEEK_END) == 0:
      return True
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


# Seconds between the appends of a remote run log's lines (each append costs requests, see `storage`).
SYNC_SECONDS = 10.0


class JsonlWriter:
  """Appends one JSON object per call to a file, thread-safe. A local file gets each line at once (flushed); a file
  on remote storage (gs://) gets the lines of the last `sync_seconds` in one append, from a thread, those written
  before a `flush` then, and the rest at `close` (an object store has no append: each one costs requests, see
  `storage`). A failed append is retried at the next sync: training never waits for it but at a `flush`."""

  def __init__(self, path: str | None, sync_seconds: float | None = None):
    self._lock = threading.Lock()
    self._appending = threading.Lock()  # one append at a time, in the order of the lines: the sync thread's, a flush's
    self._path, self._file, self._pending = path, None, []
    self._closed = threading.Event()
    self._wake = threading.Event()  # set to sync before the period is up
    if path is None:
      return
    if is_local(path):
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 — held open for the run, closed in close()
      if not _ends_a_line(path):
        # The last run's last line was cut off (a full disk, a kill mid-write): this run's first line starts a line of
        # its own instead of being glued onto it, which would lose both to a reader.
        self._file.write("\n")
        self._file.flush()
      return
    try:  # a resumed run appends to the lines of the runs before it
      self._size, self._new = storage.size(path), False  # the object's size after this writer's last append
    except FileNotFoundError:
      self._size, self._new = 0, True
    period = SYNC_SECONDS if sync_seconds is None else sync_seconds
    self._syncing = threading.Thread(target=self._sync_every, args=(period,), daemon=True, name="jsonl_sync")
    self._syncing.start()

  def write(self, record: dict[str, Any]) -> None:
    if self._path is None:
      return
    line = json.dumps({k: _to_json(v) for k, v in record.items()}, ensure_ascii=False) + "\n"
    with self._lock:
      if self._file is not None:
        self._file.write(line)
        self._file.flush()
      elif not self._closed.is_set():
        self._pending.append(line)

  def _sync_every(self, seconds: float) -> None:
    while True:
      self._wake.wait(seconds)
      self._wake.clear()
      if self._closed.is_set():
        return
      self._sync()

  def sync_soon(self) -> None:
    """Appends the lines written so far to a remote file now, from the sync thread, not when the period is up (a
    local file has every line at once: nothing to do)."""
    self._wake.set()

  def flush(self) -> None:
    """Appends the lines written so far to a remote file now, and returns once it is done or has failed (logged;
    kept for the next sync); a local file has every line at once."""
    if self._file is None and self._path is not None and not self._closed.is_set():
      self._sync()

  def _sync(self) -> None:
    with self._appending:
      with self._lock:
        lines, self._pending = self._pending, []
      if not lines:
        return
      data = "".join(lines).encode("utf-8")
      try:
        storage.append_bytes(self._path, data, new=self._new)
      except Exception as error:  # noqa: BLE001 — storage unreachable: keep the lines for the next sync
        if not self._landed(len(data)):
          logging.warning("could not append %d lines to %s (%s); retrying at the next sync", len(lines), self._path,
                          describe(error))
          with self._lock:
            self._pending[:0] = lines
          return
      self._new, self._size = False, self._size + len(data)

  def _landed(self, count: int) -> bool:
    """Whether an append of `count` bytes that raised was done all the same (its answer lost on the way back):
    retried, its lines would be in the file twice."""
    try:
      return storage.size(self._path) == self._size + count
    except Exception:  # noqa: BLE001 — not reachable to ask either: retry the append
      return False

  def close(self) -> None:
    if self._path is None or self._closed.is_set():
      return
    self._closed.set()  # later lines are dropped, as the file is closed
    self._wake.set()
    if self._file is not None:
      with self._lock:
        self._file.close()
        self._file = None
    else:
      self._syncing.join()
      self._sync()
      if self._pending:
        logging.error("%d lines of %s could not be written: %s", len(self._pending), self._path,
                      "".join(self._pending)[-2000:])


class RunLog:
  """metrics.jsonl and events.jsonl of a run directory.

  A relaunch resumes from the newest checkpoint and never logs the steps before it again, so on remote storage their
  lines must not wait up to `sync_seconds` for a process that may be killed meanwhile: the Trainer `flush`es both
  files before each save, and a `checkpoint_saved` event has them synced at once."""

  def __init__(self, workdir: str, enabled: bool = True, sync_seconds: float | None = None):
    self.metrics = JsonlWriter(storage.join(workdir, "metrics.jsonl") if enabled else None, sync_seconds)
    self.events = JsonlWriter(storage.join(workdir, "events.jsonl") if enabled else None, sync_seconds)

  def event(self, name: str, **fields: Any) -> None:
    self.events.write({"time": time.time(), "event": name, **fields})
    if name == "checkpoint_saved":
      self.metrics.sync_soon()
      self.events.sync_soon()

  def flush(self) -> None:
    """Appends the lines of both files written so far (remote storage), waiting for it."""
    self.metrics.flush()
    self.events.flush()

  def close(self) -> None:
    self.metrics.close()
    self.events.close()


# A process that stops with an error waits at most this long for its error file: the storage may be what failed, and
# the error must still reach its log (and launch.sh) soon.
ERROR_WRITE_TIMEOUT_S = 20.0
# The whole message, advice included: describe's usual 500 characters can cut off what a damaged checkpoint's error
# says to do ("move ... out of ...") after the cause it quotes.
ERROR_MESSAGE_CHARS = 4000


def record_process_error(workdir: str, error: BaseException, step: int | None = None) -> None:
  """Writes `error`, the one that stopped this process, to `errors/process_<I>.json` of the run directory, whole (see
  `storage.write_bytes`), replacing this process's error of an earlier launch: {"time", "process", "host", "pid",
  "step" (None when not known), "message"}. Only process 0 writes events.jsonl, so without it the error of another
  process, often the cause of process 0's own, reached no file of the run.

  Best effort: a failed write is logged, and one not done within `ERROR_WRITE_TIMEOUT_S` is given up on, so that the
  caller goes on to raise `error` at once."""
  try:
    process = jax.process_index()
    path = storage.process_error_path(workdir, process)
    data = json.dumps({"time": time.time(), "process": process, "host": socket.gethostname(), "pid": os.getpid(),
                       "step": step, "message": describe(error, ERROR_MESSAGE_CHARS)}, ensure_ascii=False).encode()
  except Exception as failure:  # noqa: BLE001 — must not replace the error being reported
    logging.error("could not record the error that stopped this process (%s)", describe(failure))
    return
  failures: list[BaseException] = []

  def write() -> None:
    try:
      storage.write_bytes(path, data)
    except Exception as failure:  # noqa: BLE001 — reported below, by the caller's thread
      failures.append(failure)

  if not finishes_within(ERROR_WRITE_TIMEOUT_S, write, "process_error"):
    logging.error("writing %s took over %.0f s; given up: this error is in this process's log only", path,
                  ERROR_WRITE_TIMEOUT_S)
  elif failures:
    logging.error("could not write %s (%s): this error is in this process's log only", path, describe(failures[0]))


def _encoder_flops(tokens: int, dim: int, mlp: int, layers: int) -> float:
  """Forward FLOPs of a pre-norm encoder stack over `tokens` tokens (per sample)."""
  projections = 5 * dim * dim + 3 * dim * mlp  # q, k, v, gate, o and the SwiGLU
  attention = 2 * tokens * dim  # q·k and weights·v, per query token
  return 2.0 * layers * tokens * (projections + attention)


def forward_flops(cfg: EchoConfig, frames: int, text_len: int, ref_frames: int) -> float:
  """Model FLOPs of one forward pass for one sample (matmuls only; 1 multiply-add = 2 FLOPs)."""
  patches = ref_frames // cfg.speaker_patch
  text = _encoder_flops(text_len, cfg.text_dim, cfg.text_mlp_dim, cfg.text_layers)
  speaker = (_encoder_flops(patches, cfg.speaker_dim, cfg.speaker_mlp_dim, cfg.speaker_layers)
             + 2.0 * patches * cfg.speaker_patch * cfg.latent_dim * cfg.speaker_dim)
  context = 2.0 * cfg.layers * 2 * cfg.dim * (text_len * cfg.text_dim + patches * cfg.speaker_dim)
  keys = frames + text_len + patches
  per_frame_layer = (5 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.mlp_dim  # projections and SwiGLU
                     + 2 * keys * cfg.dim)  # attention over self, text and speaker keys
  decoder = 2.0 * frames * (cfg.layers * per_frame_layer + 2 * cfg.latent_dim * cfg.dim)
  # The condition is per sample, not per frame: the timestep MLP and the two low-rank AdaLNs of every layer.
  condition = 2.0 * (cfg.timestep_dim * cfg.dim + 4 * cfg.dim * cfg.dim
                     + cfg.layers * 2 * 3 * 2 * cfg.dim * cfg.adaln_rank)
  return text + speaker + context + decoder + condition


def train_flops_per_step(cfg: EchoConfig, batch: int, frames: int, text_len: int, ref_frames: int) -> float:
  """Forward + backward (≈ 3 × forward) model FLOPs of one train step of a global batch; remat not counted."""
  return 3.0 * batch * forward_flops(cfg, frames, text_len, ref_frames)


def measure_matmul_peak(size: int = 2048, repeats: int = 5, dtype: Any = jnp.float32) -> float:
  """FLOP/s of a square matmul on the first device: the CPU's practical peak for MFU (float32), or on an
  accelerator the practical bf16 rate to set beside the data-sheet peak of `PEAK_FLOPS_PER_DEVICE`."""
  device = jax.devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


def peak_flops_per_device(cpu_peak: float = 0.0) -> float:
  """The device's peak from the table, or for CPU the given peak (measured when 0)."""
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS_PER_DEVICE.items():
    if kind.startswith(name):
      return peak
  if jax.devices()[0].platform == "cpu":
    # All host-platform devices share the same cores, so one matmul's rate is the whole machine's peak.
    return (cpu_peak or measure_matmul_peak()) / jax.local_device_count()
  raise ValueError(f"no peak FLOP/s known for device kind {kind!r}; add it to PEAK_FLOPS_PER_DEVICE")
