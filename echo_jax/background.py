"""Work started in a thread of its own and waited for later, e.g. what a launch needs only after its first step."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any


class InBackground:
  """`fn()` computed once, in a thread of its own that `start` starts; `result` waits for it (starting it if nothing
  has). Meant for one thread to start and wait on."""

  def __init__(self, name: str, fn: Callable[[], Any]):
    self._name, self._fn = name, fn
    self._future: concurrent.futures.Future | None = None

  def start(self) -> None:
    if self._future is None:
      thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
      self._future = thread.submit(self._fn)
      thread.shutdown(wait=False)  # the submitted work still runs; no more comes

  def done(self) -> bool:
    """Whether it has been started and has finished (or failed: `result` raises its error)."""
    return self._future is not None and self._future.done()

  def result(self) -> Any:
    self.start()
    return self._future.result()
