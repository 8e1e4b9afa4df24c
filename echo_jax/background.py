"""Work started in a thread of its own and waited for later, e.g. what a launch needs only after its first step."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any


class InBackground:
  """`fn()` computed once, in a thread of its own that `start` starts; `result` waits for it (starting it if nothing
  has). Meant for one thread to start and wait on. A `daemon` thread does not hold the process's exit: for work that
  may stall on the network and that a finished or failed run no longer needs."""

  def __init__(self, name: str, fn: Callable[[], Any], *, daemon: bool = False):
    self._name, self._fn, self._daemon = name, fn, daemon
    self._future: concurrent.futures.Future | None = None

  def start(self) -> None:
    if self._future is not None:
      return
    future = self._future = concurrent.futures.Future()

    def run() -> None:
      future.set_running_or_notify_cancel()
      try:
        future.set_result(self._fn())
      except BaseException as error:  # noqa: BLE001 — handed to whoever waits in `result`
        future.set_exception(error)

    threading.Thread(target=run, name=self._name, daemon=self._daemon).start()

  def done(self) -> bool:
    """Whether it has been started and has finished (or failed: `result` raises its error)."""
    return self._future is not None and self._future.done()

  def result(self, timeout: float | None = None) -> Any:
    """`fn()`'s value or error; TimeoutError when `timeout` seconds pass first (it goes on running)."""
    self.start()
    return self._future.result(timeout)


def finishes_within(seconds: float, fn: Callable[[], Any], name: str) -> bool:
  """Runs `fn()` in a daemon thread (so that a call hung on dead storage ends with the process) and waits for it at
  most `seconds`; whether it finished by then. Its errors are `fn`'s to handle."""
  thread = threading.Thread(target=fn, name=name, daemon=True)
  thread.start()
  thread.join(seconds)
  return not thread.is_alive()
