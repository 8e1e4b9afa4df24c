"""Where a launch's seconds go: runs a Python script under a sampler of every thread's stack, then reads the samples
back as a timeline of what each thread was doing (an import, a restore, an executable's load...).

    python bench/stack_sampler.py OUT.json.gz SCRIPT [ARGS ...]   # runs SCRIPT as __main__, samples it
    python bench/stack_sampler.py --report OUT.json.gz            # prints the timeline

`bench/restart.py --profile` runs a warm restart this way. The samples are written when the script exits, or
as soon as the file `OUT.json.gz.stop` appears (for a script that is killed afterwards). A profiler written here
because py-spy and its kind are not on the machines it is meant for (a bare GPU or TPU VM), and cProfile sees one
thread only, while a launch's time is spent in several: the restore, the executable's load and the data's opening
run beside each other. Every 20 ms the sampler walks each thread's stack, holding the GIL meanwhile.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gzip
import json
import os
import runpy
import sys
import threading
import time
from typing import Any

INTERVAL_S = 0.02
MAX_DEPTH = 200
# A thread whose innermost frame is one of these is waiting for work, not doing any.
_IDLE = ("threading.py:wait", "queue.py:get", "selectors.py:select", "thread.py:_worker", "_monitor.py:run")


def _frames(frame: Any) -> list[str]:
  """`file:function` of `frame` and its callers, innermost first (frozen importlib frames left out)."""
  stack = []
  while frame is not None and len(stack) < MAX_DEPTH:
    code = frame.f_code
    if not code.co_filename.startswith("<frozen"):
      stack.append(f"{code.co_filename}:{code.co_name}")
    frame = frame.f_back
  return stack


class Sampler:
  """Samples the stack of every other thread every INTERVAL_S seconds, from a daemon thread, into memory."""

  def __init__(self, out: str, script: str):
    self.out = out
    with contextlib.suppress(FileNotFoundError):  # a request left by an earlier run
      os.remove(f"{out}.stop")
    self.script = script
    self.start = time.time()
    self.samples: list[tuple[float, str, list[str]]] = []
    self._written = threading.Lock()
    self._done = False

  def run(self) -> None:
    me = threading.get_ident()
    while not os.path.exists(f"{self.out}.stop"):
      names = {thread.ident: thread.name for thread in threading.enumerate()}
      now = round(time.time() - self.start, 3)
      for ident, frame in sys._current_frames().items():  # noqa: SLF001 — the one way to see other threads' stacks
        if ident != me:
          self.samples.append((now, names.get(ident, str(ident)), _frames(frame)))
      time.sleep(INTERVAL_S)
    self.write()

  def write(self) -> None:
    """Writes the samples once (at the stop file or at exit, whichever comes first), complete or not at all."""
    with self._written:
      if self._done:
        return
      self._done = True
      temporary = f"{self.out}.tmp"
      with gzip.open(temporary, "wt", encoding="utf-8") as f:
        json.dump({"start": self.start, "script": self.script, "samples": self.samples}, f)
      os.replace(temporary, self.out)


def request_write(out: str, timeout_s: float = 60.0) -> None:
  """Asks the sampler of the script that writes `out` to stop and write its samples now; returns once they are
  written (the script runs on)."""
  with open(f"{out}.stop", "w", encoding="utf-8"):
    pass
  deadline = time.time() + timeout_s
  while not os.path.exists(out):
    if time.time() > deadline:
      raise TimeoutError(f"the stack sampler did not write {out} within {timeout_s:.0f} s")
    time.sleep(0.05)


def _library(path: str, script: str) -> str | None:
  """The installed package (or standard-library folder) a source file belongs to; None for the script's own
  repository (the folder that holds the script)."""
  parts = path.split(os.sep)
  for marker in ("site-packages", "dist-packages"):
    if marker in parts:
      return parts[parts.index(marker) + 1].removesuffix(".py")
  if path.startswith(os.path.dirname(script) + os.sep):
    return None
  return parts[-2] if len(parts) > 1 else parts[-1]


def imports(stack: list[str], script: str) -> list[str]:
  """The libraries that a sampled stack of `script` is importing, outermost first: those of its module frames inside
  the script's own, outside the script's repository."""
  inside = stack.index(f"{script}:<module>") if f"{script}:<module>" in stack else len(stack)
  chain = dict.fromkeys(_library(frame.rsplit(":", 1)[0], script) for frame in reversed(stack[:inside])
                        if frame.endswith(":<module>"))
  return [name for name in chain if name is not None]


def activity(stack: list[str], script: str) -> str | None:
  """What a sampled stack (innermost first) of `script` was doing, in a few words: the library our code is
  importing, else our innermost function and the innermost one; None for a thread waiting for work."""
  if not stack or any(f"{os.sep}{idle}" in stack[0] for idle in _IDLE):
    return None
  libraries = imports(stack, script)
  if libraries:
    return f"import {libraries[0]}"
  ours = next((frame for frame in stack if f"{os.sep}echo_jax{os.sep}" in frame), None)
  inner = stack[0].rsplit(os.sep, 1)[-1]
  return inner if ours is None else f"{ours.rsplit(os.sep, 1)[-1]} · {inner}"


def read(path: str) -> dict[str, Any]:
  """What a sampler wrote: its start time, the script, and the samples."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return json.load(f)


def timeline(recorded: dict[str, Any], min_seconds: float = 0.2) -> dict[str, list[tuple[float, float, str]]]:
  """thread -> [(from, to, activity)] of `recorded` samples (`read`): the runs of one activity at least `min_seconds`
  long, in seconds since the sampler started."""
  by_thread: dict[str, list[tuple[float, str | None]]] = {}
  for when, thread, stack in recorded["samples"]:
    by_thread.setdefault(thread, []).append((when, activity(stack, recorded["script"])))
  runs: dict[str, list[tuple[float, float, str]]] = {}
  for thread, seen in by_thread.items():
    start, current, last = seen[0][0], seen[0][1], seen[0][0]
    for when, what in [*seen[1:], (None, None)]:
      if when is None or what != current:
        if current is not None and last - start >= min_seconds:
          runs.setdefault(thread, []).append((start, last, current))
        if when is None:
          break
        start, current = when, what
      last = when
  return runs


def import_seconds(recorded: dict[str, Any]) -> dict[str, float]:
  """Library -> sampled seconds (samples x INTERVAL_S) the main thread spent importing it, its own imports included
  (so the figures of a library and of what it imports overlap), most first. An undercount where an import holds the
  GIL (loading an extension module), which delays the samples; the timeline's times are the clock's."""
  counts: dict[str, int] = {}
  for _, thread, stack in recorded["samples"]:
    if thread == "MainThread":
      for name in imports(stack, recorded["script"]):
        counts[name] = counts.get(name, 0) + 1
  return {name: round(count * INTERVAL_S, 2) for name, count in sorted(counts.items(), key=lambda kv: -kv[1])}


def report(path: str, min_seconds: float = 0.2) -> str:
  """The timeline (seconds since the sampler started) of every thread that did something for `min_seconds`, and
  the main thread's imports that took that long."""
  recorded, lines = read(path), []
  for thread, runs in timeline(recorded, min_seconds).items():
    lines.append(f"  {thread}")
    lines += [f"    {start:6.2f}-{end:6.2f} s  {end - start:5.2f} s  {what}" for start, end, what in runs]
  slow = [f"{name} {seconds:.2f} s" for name, seconds in import_seconds(recorded).items() if seconds >= min_seconds]
  lines.append(f"  imports (sampled, nested ones counted in each): {', '.join(slow) or 'none'}")
  return "\n".join(lines)


def main() -> None:
  if sys.argv[1:2] == ["--report"]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", required=True, metavar="OUT.json.gz")
    parser.add_argument("--min_seconds", type=float, default=0.2, help="shortest run of one activity shown")
    args = parser.parse_args()
    print(report(args.report, args.min_seconds))
    return
  if len(sys.argv) < 3:
    sys.exit(__doc__)
  script = os.path.abspath(sys.argv[2])
  sampler = Sampler(os.path.abspath(sys.argv[1]), script)
  atexit.register(sampler.write)
  threading.Thread(target=sampler.run, name="stack_sampler", daemon=True).start()
  sys.argv = [script, *sys.argv[3:]]
  sys.path.insert(0, os.path.dirname(script))
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main()
