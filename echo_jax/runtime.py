"""Process-level set-up of a run (DESIGN §5): the multi-host JAX runtime and the persistent compilation cache.

Both must happen before JAX touches a device, so `train_pretrain.py` calls them first.

On a TPU pod `jax.distributed.initialize()` finds the coordinator, process count and process id by itself. A local
simulation (`launch.sh --local N`, the multi-host tests) names them through flags or the environment variables
ECHO_COORDINATOR (host:port), ECHO_NUM_PROCESSES and ECHO_PROCESS_ID. CPU processes exchange collectives over gloo.
"""

from __future__ import annotations

import contextlib
import faulthandler
import glob
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import jax
from absl import logging

from echo_jax.background import finishes_within
from echo_jax.errors import UserError

ENV_COORDINATOR = "ECHO_COORDINATOR"
ENV_NUM_PROCESSES = "ECHO_NUM_PROCESSES"
ENV_PROCESS_ID = "ECHO_PROCESS_ID"
EXIT_DELAY_PROCESS_0_S = 3.0
# How long a stuck process waits for `HangWatchdog.report` before it exits: over metrics.ERROR_WRITE_TIMEOUT_S, the
# time its error file is given, with room for the event.
REPORT_TIMEOUT_S = 30.0


def _on_tpu_vm() -> bool:
  """True on a Cloud TPU VM whose TPU JAX may use (its chips are /dev/accel* or /dev/vfio/N devices)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to the multi-host runtime, or does nothing for a single-process run.

  Arguments left None are taken from ECHO_COORDINATOR / ECHO_NUM_PROCESSES / ECHO_PROCESS_ID. With none given and
  not on a TPU VM the run is single-process; on a TPU VM JAX detects the pod itself.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  # The Trainer's SIGTERM stop of joined hosts is JAX's preemption sync point, which needs JAX's preemption service
  # (on by default; with it turned off, the Trainer would refuse to start).
  jax.config.update("jax_enable_preemption_service", True)
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
  if all(value is None for value in given.values()):
    if _on_tpu_vm():
      jax.distributed.initialize()
    return
  missing = [name for name, value in given.items() if value is None]
  if missing:
    raise ValueError(f"a simulated multi-host run needs coordinator_address, num_processes and process_id "
                     f"(flags or {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}); missing {missing}")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process_id {process_id} is outside [0, num_processes={num_processes})")
  if num_processes == 1:
    return
  # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def print_error(error: BaseException) -> None:
  """Prints `error` for the user: a `UserError` as its message alone (it says what to do), any other with its
  traceback."""
  if isinstance(error, UserError):
    print(f"error: {error}", file=sys.stderr, flush=True)
  else:
    traceback.print_exception(error)


@contextlib.contextmanager
def exit_at_once_on_error() -> Iterator[None]:
  """In a multi-process run, an exception inside ends this process at once (exit 1) once it is printed (`print_error`).

  Exiting the normal way would run JAX's distributed shutdown, which waits for every process at a barrier (5 minutes)
  that the others, blocked in a collective with this one (e.g. in Orbax's restore), never reach; both then abort
  with a stack dump that buries the error. launch.sh sees this exit at once, shows the error and stops the others.
  """
  try:
    yield
  except Exception:
    if jax.process_count() == 1:
      raise
    print_error(sys.exc_info()[1])
    sys.stdout.flush()
    sys.stderr.flush()
    if jax.process_index() == 0:
      # Process 0 hosts the coordination service: leaving at once would abort processes failing at the same moment
      # (exit 134, their own error unprinted). A few seconds let them print it and leave first.
      time.sleep(EXIT_DELAY_PROCESS_0_S)
    os._exit(1)


class RunStuckError(RuntimeError):
  """What a process that `HangWatchdog` ended reports: it made no progress for the watchdog's timeout."""


class HangWatchdog:
  """Ends a process that stops making progress: once `timeout` seconds pass without a `beat`, it logs `what` and
  the stack of every thread (faulthandler), hands `report` a one-line account of it, and exits 1, so that launch.sh
  reports the failure with those stacks instead of a pod that bills hours while every host waits, e.g. in a
  collective for a host whose data read hangs on a dead mount. A daemon thread; `stop` disarms it, and a `timeout`
  of 0 starts none. (faulthandler's dump_traceback_later alone would exit without saying why, and the exit on a
  failed process 0 must wait as `exit_at_once_on_error`'s does.)

  `report` (e.g. writing the run's error files, for the dashboard) runs on a thread of its own and is given
  `REPORT_TIMEOUT_S`: what hangs may be the storage it writes to, and the process must still exit."""

  def __init__(self, timeout: float, what: str, report: Callable[[str], None] | None = None):
    self.timeout = timeout
    self.what = what
    self.report = report
    self._last = time.monotonic()
    self._stopped = threading.Event()
    if timeout > 0:
      threading.Thread(target=self._watch, name="hang_watchdog", daemon=True).start()

  def beat(self) -> None:
    self._last = time.monotonic()

  def stop(self) -> None:
    self._stopped.set()

  def _watch(self) -> None:
    while not self._stopped.wait(min(self.timeout / 4, 10.0)):
      idle = time.monotonic() - self._last
      if idle >= self.timeout:
        try:
          logging.error("%s for %.0f s: the run is stuck, and exits. The stack of every thread follows.",
                        self.what, idle)
          sys.stderr.flush()
          # To file descriptor 2: sys.stderr may be an object without one (a notebook, a capture).
          faulthandler.dump_traceback(file=2, all_threads=True)
          self._report(f"{self.what} for {idle:.0f} s: the process was stuck and exited (1); the stack of every "
                       "thread is in its log")
          if jax.process_count() > 1 and jax.process_index() == 0:
            time.sleep(EXIT_DELAY_PROCESS_0_S)  # as in exit_at_once_on_error
        finally:
          os._exit(1)  # whatever failed above: a stuck run must not outlive its watchdog

  def _report(self, message: str) -> None:
    if self.report is None:
      return

    def report() -> None:
      try:
        self.report(message)
      except Exception:  # noqa: BLE001 — the exit must follow all the same
        logging.exception("could not report the stuck run")

    if not finishes_within(REPORT_TIMEOUT_S, report, "hang_report"):
      logging.error("reporting the stuck run took over %.0f s; given up: it is in this process's log only",
                    REPORT_TIMEOUT_S)


def enable_compilation_cache(directory: str) -> bool:
  """Keeps compiled programs in `directory` (local path or gs://) so a restart skips compilation; True when on.

  On a pod, a gs:// directory shared by all hosts lets every host and every restart reuse one compilation.
  An empty `directory` leaves the cache off, and so does a CPU run over more than one device: with jax 0.10.2,
  XLA:CPU programs with cross-device collectives that are loaded back from the cache can deadlock (devices stop at
  different collectives; seen with the eval step on 8 host-platform devices), so such runs always compile.

  Off means off, also when JAX_COMPILATION_CACHE_DIR is set in the environment, which JAX reads by itself (and
  echo_jax's executable cache follows JAX's setting): before, a CPU run over several devices still used both caches
  there, and an empty compile_cache_dir (the switch for a suspected stale cache) turned neither off.
  """
  if not directory:
    jax.config.update("jax_enable_compilation_cache", False)
    return False
  if jax.devices()[0].platform == "cpu" and jax.device_count() > 1:
    logging.warning("persistent compilation cache left off: XLA:CPU programs with collectives over %d devices can "
                    "deadlock when loaded back from it; each launch compiles", jax.device_count())
    jax.config.update("jax_enable_compilation_cache", False)
    return False
  if "://" not in directory:
    directory = os.path.expanduser(directory)
    os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  return True


def process_batch_rows(sharding: jax.sharding.Sharding, batch_size: int,
                       process: int | None = None) -> list[tuple[int, int]]:
  """The blocks of rows [start, stop), ascending, of a global batch of `batch_size` rows that the devices of this
  process (or of `process`) hold under `sharding`: `jax.make_array_from_process_local_data` takes them from the
  process in that order. On a TPU slice there are several: the mesh follows the chips' torus, so hosts interleave
  along the batch (each host of a v4-64 holds 4 blocks of 8 rows of 256 under FSDP over the 32 chips)."""
  rows = sorted({row for device, index in sharding.devices_indices_map((batch_size,)).items()
                 if device.process_index == (jax.process_index() if process is None else process)
                 for row in range(batch_size)[index[0]]})
  blocks: list[tuple[int, int]] = []
  for row in rows:
    if blocks and blocks[-1][1] == row:
      blocks[-1] = (blocks[-1][0], row + 1)
    else:
      blocks.append((row, row + 1))
  return blocks
