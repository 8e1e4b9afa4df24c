"""Live training dashboard (DESIGN §10): reads run directories and serves a self-contained page plus a JSON API.

A run directory (DESIGN §7) holds `metrics.jsonl`, `events.jsonl`, `checkpoints/`, `samples/step_<N>/` and, for each
process that stopped with an error, `errors/process_<I>.json`. Files
are read through fsspec, so a run on gs:// works like a local one, and incrementally: each refresh reads only the
bytes appended since the last one, so a long, growing `metrics.jsonl` stays cheap. Long histories are downsampled
on the server (min and max per bucket, so spikes survive) before they are sent.

The server is read-only and serves nothing but the page assets and the sample files (wav, png, txt) inside the
given run directories; every other path, including any traversal attempt, is answered with 404.
"""

from __future__ import annotations

import gc
import http.server
import ipaddress
import itertools
import math
import operator
import os
import posixpath
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import orjson

from echo_jax import storage

PAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard_page")
MAX_POINTS = 2000
# How often the background thread of each run looks for appended lines (a stat of two files).
REFRESH_INTERVAL_S = 0.5
# A request that arrives while a run's first read is still going waits at most this long (in all, over the runs it
# asks about) before it is answered with what was read so far and `"loading": true`: small runs are read in far less,
# so their first answer is complete, and a huge history never keeps the page waiting long.
FIRST_LOAD_WAIT_S = 0.5
# Listing checkpoints/ and samples/ is slower (and costs requests on gs://), so it happens less often.
LISTING_INTERVAL_S = 5.0
# Events are few except skipped samples, which can be many; the table only needs the recent ones.
MAX_EVENTS_KEPT = 1000
MAX_SAMPLE_TEXT_BYTES = 4096
# An error file holds one message of at most metrics.ERROR_MESSAGE_CHARS characters; anything larger is not one.
MAX_ERROR_FILE_BYTES = 64 << 10
# A chunk of this many bytes is parsed at once: large enough to amortise the per-chunk work, small enough that the
# parsed dicts of one chunk never dominate memory.
READ_CHUNK_BYTES = 16 << 20
# A run counts as stale once no metric arrived for this many typical logging intervals (and at least the minimum).
STALE_INTERVALS = 5
MIN_STALE_S = 60.0
# The rate (steps/s, hence the ETA) is measured over at most this many of the current launch's latest metrics lines.
RATE_WINDOW_LINES = 50
# What `status` says of a run: training ("live"), silent for longer than its logging interval explains ("stale"), or
# not training: at total_steps, stopped on request short of it, stopped by an error.
RUN_STATES = ("live", "stale", "finished", "stopped", "failed")
# The events that end a launch: the trainer writes `stopped` when it stops short on request (SIGTERM, Ctrl-C), and one
# of the others when an error stops it.
_STOP_EVENTS = {"stopped": "stopped", "error": "failed", "checkpoint_failed": "failed",
                "checkpoint_restore_failed": "failed"}

_SAMPLE_KINDS = {".wav": "audio/wav", ".png": "image/png", ".txt": "text/plain; charset=utf-8"}
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_PROM_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")
_PAGE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
# The page loads only its own scripts: an injected inline <script> would not run even if escaping failed. uPlot
# sizes its elements through inline styles, hence 'unsafe-inline' for styles only.
_PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
             "media-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class JsonlTail:
  """Reads the complete lines appended to a JSONL file since the previous call.

  A partially written last line is kept back until its newline arrives. A file that shrank was rewritten, so it
  is read again from the start and `reset` is set for the caller to drop what it built from the old content.
  """

  def __init__(self, url: str):
    self.fs, self.path = fsspec.core.url_to_fs(url)
    self.offset = 0
    self.bad_lines = 0
    self.reset = False

  def read_new(self) -> Iterable[list[dict[str, Any]]]:
    """Yields the newly completed records, parsed, in chunks of at most `READ_CHUNK_BYTES`."""
    self.reset = False
    self.fs.invalidate_cache(self.path)
    try:
      size = self.fs.size(self.path)
    except FileNotFoundError:
      return
    if size < self.offset:
      self.offset, self.reset = 0, True
      yield []
    if size == self.offset:
      return
    with self.fs.open(self.path, "rb") as f:
      f.seek(self.offset)
      carry = b""
      while self.offset + len(carry) < size:
        block = f.read(min(READ_CHUNK_BYTES, size - self.offset - len(carry)))
        if not block:
          break
        data = carry + block
        end = data.rfind(b"\n") + 1
        if end == 0:
          carry = data
          continue
        carry = data[end:]
        yield self._parse(data[:end])
        self.offset += end  # once the caller has taken the lines in: if it fails, the next refresh reads them again

  def _parse(self, data: bytes) -> list[dict[str, Any]]:
    lines = data.split(b"\n")
    try:
      records = [orjson.loads(line) for line in lines if line]
      if all(type(r) is dict for r in records):
        return records
    except orjson.JSONDecodeError:
      pass
    # Some line is malformed: parse line by line and count the bad ones.
    records = []
    for line in lines:
      if not line.strip():
        continue
      try:
        record = orjson.loads(line)
      except orjson.JSONDecodeError:
        self.bad_lines += 1
        continue
      if isinstance(record, dict):
        records.append(record)
      else:
        self.bad_lines += 1
    return records


class MetricColumns:
  """Numeric metric columns, one row per metrics line; a key missing from a line is NaN in that row.

  A non-finite value (the trainer writes NaN and infinity as the strings "nan", "inf", "-inf": JSON has neither) is
  NaN in its column too, so that every reader of the columns sees finite values only, and is kept aside, with its
  row, in `nonfinite`: a NaN loss must be shown as one, not hidden behind the last finite loss."""

  def __init__(self):
    self.rows = 0
    self._chunks: dict[str, list[np.ndarray]] = {}
    self._merged: dict[str, np.ndarray] = {}
    self._nonfinite: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

  def append(self, records: Sequence[dict[str, Any]]) -> None:
    """Adds one row per record; non-numeric values are ignored."""
    if not records:
      return
    n = len(records)
    fresh: dict[str, np.ndarray] = {}
    for layout, rows, table, nonfinite in _layout_tables(records):
      if nonfinite.any():
        for j in np.flatnonzero(nonfinite.any(axis=0)).tolist():
          marked = nonfinite[:, j]
          self._nonfinite.setdefault(layout[j], []).append((rows[marked] + self.rows, table[marked, j]))
        table = np.where(nonfinite, np.nan, table)
      for j, key in enumerate(layout):
        # A key logged with non-finite values only is still a key of the run: its chart marks where they are.
        if np.isnan(table[:, j]).all() and not nonfinite[:, j].any():
          continue
        if key not in fresh:
          fresh[key] = np.full(n, np.nan)
        fresh[key][rows] = table[:, j]
    for key, column in fresh.items():
      if key not in self._chunks:
        self._chunks[key] = [np.full(self.rows, np.nan)] if self.rows else []
      self._chunks[key].append(column)
    for key, chunks in self._chunks.items():
      if key not in fresh:
        chunks.append(np.full(n, np.nan))
    self.rows += n

  def names(self) -> list[str]:
    return sorted(self._chunks)

  def nonfinite(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, values) of the non-finite values logged for `key`, in row order."""
    chunks = self._nonfinite.get(key)
    if not chunks:
      return np.zeros(0, np.intp), np.zeros(0)
    if len(chunks) > 1:
      chunks[:] = [(np.concatenate([r for r, _ in chunks]), np.concatenate([v for _, v in chunks]))]
    return chunks[0]

  def nonfinite_rows(self) -> int:
    """How many rows hold a non-finite value of any key."""
    rows = [self.nonfinite(key)[0] for key in list(self._nonfinite)]
    return int(np.unique(np.concatenate(rows)).size) if rows else 0

  def column(self, key: str) -> np.ndarray:
    """The whole column (NaN where absent); all-NaN if the key never appeared."""
    chunks = self._chunks.get(key)
    if chunks is None:
      return np.full(self.rows, np.nan)
    if len(chunks) > 1:
      chunks[:] = [np.concatenate(chunks)]
    return chunks[0] if chunks else np.full(0, np.nan)


def _layout_tables(records: Sequence[dict[str, Any]]) -> Iterator[tuple[tuple[str, ...], np.ndarray, np.ndarray,
                                                                         np.ndarray]]:
  """(key layout, row indices, [rows, keys] float64 table, [rows, keys] mask of the non-finite values logged) for
  each group of records that share their keys.

  Metrics lines mostly share a few key sets; converting each set's rows in one numpy call is several times faster
  than gathering every key record by record. Records are first grouped by their number of keys, which is cheap;
  only a group whose records turn out to differ in key names is split by the exact key tuple.
  """
  n = len(records)
  lengths = np.fromiter(map(len, records), dtype=np.intp, count=n)
  for length in np.unique(lengths).tolist():
    if length == 0:  # `{}`: no values (and no key layout to read them by)
      continue
    rows = np.arange(n) if lengths[0] == length and (lengths == length).all() else np.flatnonzero(lengths == length)
    group = records if rows.size == n else [records[i] for i in rows.tolist()]
    layout = tuple(group[0])
    try:
      table = _numeric_table(group, layout)
    except KeyError:
      table = None
    if table is not None:
      yield layout, rows, *table
      continue
    codes: dict[tuple[str, ...], int] = {}
    group_codes = np.array([codes.setdefault(tuple(r), len(codes)) for r in group])
    for exact, code in codes.items():
      members = np.flatnonzero(group_codes == code)
      yield exact, rows[members], *_numeric_table([group[i] for i in members.tolist()], exact)


def _numeric_table(records: Sequence[dict[str, Any]], layout: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
  """([len(records), len(layout)] float64 values of `layout`'s keys, mask of the non-finite values among them);
  KeyError if a record lacks one of them."""
  getter = operator.itemgetter(*layout)
  rows = map(getter, records)
  # With one key the getter returns the value itself rather than a 1-tuple.
  values = itertools.chain.from_iterable(rows) if len(layout) > 1 else rows
  shape = (len(records), len(layout))
  try:
    table = np.fromiter(values, dtype=np.float64, count=shape[0] * shape[1]).reshape(shape)
    nonfinite = ~np.isfinite(table)
    # A JSON number is finite; NaN or infinity here comes from a string such as "nan" (a value logged non-finite) or
    # from a null (a value not logged), which numpy reads as NaN too.
    for i, j in zip(*np.nonzero(nonfinite), strict=True):
      nonfinite[i, j] = _is_nonfinite(records[i][layout[j]])
    return table, nonfinite
  except (TypeError, ValueError):
    # Some value is not a number (a string, a list): convert value by value, non-numbers becoming NaN.
    table = np.array([[_as_float(r[k]) for k in layout] for r in records], dtype=np.float64).reshape(shape)
    nonfinite = np.array([[_is_nonfinite(r[k]) for k in layout] for r in records], dtype=bool).reshape(shape)
    return table, nonfinite


def _as_float(value: Any) -> float:
  if _is_nonfinite(value):
    return float(value)
  if isinstance(value, bool) or not isinstance(value, int | float):
    return math.nan
  return float(value)


def _is_nonfinite(value: Any) -> bool:
  """Whether `value` is a non-finite number as a JSON line holds one: a string such as "nan", "inf" or "-inf"."""
  if not isinstance(value, str):
    return False
  try:
    return not math.isfinite(float(value))
  except ValueError:
    return False


def _nonfinite_name(value: float) -> str:
  """"nan", "inf" or "-inf", as the trainer writes the value in metrics.jsonl."""
  return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _not_superseded(steps: np.ndarray) -> np.ndarray:
  """Which points of a series (its steps, in the order logged) a resumed run did not log again: a relaunch resumes
  from its newest checkpoint and logs again the steps after it that the stopped run had logged, so a point stands
  only if every later point has a higher step. Else the curve would run back to the checkpoint and draw the stopped
  run's last steps under the relaunch's."""
  later_min = np.minimum.accumulate(steps[::-1])[::-1]  # the lowest step from each point on
  return steps < np.append(later_min[1:], np.inf)


def _current_launch(steps: np.ndarray, times: np.ndarray, since: float | None) -> np.ndarray:
  """Indices of the lines of the latest launch among metrics lines (their steps and times, in the order logged): those
  logged since `since` (the newest `start` event's time, if any), and of them the trailing run in which neither step
  nor time goes back. A relaunch resumes from its newest checkpoint, so its first line usually has a lower step than
  the stopped launch's last; measured across the two, the rate would count the downtime as training and the steps
  logged again twice. Equal steps stay in the run: an eval line has the step of the train line after it."""
  back = np.flatnonzero((np.diff(steps) < 0) | (np.diff(times) < 0)) + 1
  first = int(back[-1]) if back.size else 0
  if since is not None:
    first = max(first, int(np.searchsorted(times[first:], since)) + first)
  if first >= steps.size:  # nothing logged since the newest start yet: the latest line stands alone
    first = steps.size - 1
  return np.arange(first, steps.size)


def downsample_indices(n: int, values: np.ndarray, max_points: int) -> np.ndarray:
  """Indices into `values` (length `n`) of at most `max_points` points that keep each bucket's min and max.

  The first and last points are always kept so a live chart shows the latest value exactly.
  """
  if max_points < 4:
    raise ValueError(f"max_points must be at least 4, got {max_points}")
  if n <= max_points:
    return np.arange(n)
  inner = values[1:-1]
  buckets = (max_points - 2) // 2
  size = -(-inner.size // buckets)
  buckets = -(-inner.size // size)
  pad = buckets * size - inner.size
  low = np.concatenate([inner, np.full(pad, np.inf)]).reshape(buckets, size)
  high = np.concatenate([inner, np.full(pad, -np.inf)]).reshape(buckets, size)
  base = np.arange(buckets) * size + 1
  picks = np.concatenate([[0], base + low.argmin(axis=1), base + high.argmax(axis=1), [n - 1]])
  return np.unique(picks)


def _json_bytes(payload: Any) -> bytes:
  # "<", ">" and "&" are escaped so no JSON response can ever be sniffed or embedded as markup.
  text = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY).decode()
  return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def _last_finite_row(column: np.ndarray, window: int = 4096) -> int | None:
  """The row of the last finite value of `column`; looks at the tail first because the latest line nearly always
  has it."""
  for start in (max(0, column.size - window), 0):
    finite = np.flatnonzero(np.isfinite(column[start:]))
    if finite.size:
      return start + int(finite[-1])
  return None


class _GcPause:
  """Pauses the garbage collector: the millions of fresh dicts and tuples of a large read would otherwise trigger
  repeated full collections that cost more than the parsing itself. Counted, because every run is read by its own
  thread and the collector must stay off until the last of the overlapping reads is done."""

  def __init__(self):
    self._lock = threading.Lock()
    self._depth = 0
    self._was_enabled = False

  def __enter__(self) -> None:
    with self._lock:
      if self._depth == 0:
        self._was_enabled = gc.isenabled()
        gc.disable()
      self._depth += 1

  def __exit__(self, *exc_info: object) -> None:
    with self._lock:
      self._depth -= 1
      if self._depth == 0 and self._was_enabled:
        gc.enable()


_gc_paused = _GcPause()


class RunState:
  """Everything the dashboard knows about one run directory, refreshed incrementally.

  `refresh` (called by the dashboard's background thread for this run) reads and parses the files without holding
  `lock`, which guards only what requests read; each parsed chunk is added under the lock as soon as it is ready.
  So a request never waits for a long first read: it sees the lines read so far, and `loaded` tells whether the
  first read, up to the size the files had when it began, is complete.
  """

  def __init__(self, url: str, name: str):
    self.url = url.rstrip("/")
    self.name = name
    self.fs, self.root = fsspec.core.url_to_fs(self.url)
    self.lock = threading.Lock()
    self.loaded = threading.Event()
    self.error: str | None = None
    self._read_lock = threading.Lock()
    self.metrics_tail = JsonlTail(f"{self.url}/metrics.jsonl")
    self.events_tail = JsonlTail(f"{self.url}/events.jsonl")
    self.columns = MetricColumns()
    self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS_KEPT)
    self.skipped: list[tuple[float, float, float]] = []  # (step, time, cumulative count)
    self.last_checkpoint: dict[str, Any] | None = None
    self.listed_checkpoint_step: int | None = None
    self.samples: list[dict[str, Any]] = []
    self.process_errors: list[dict[str, Any]] = []
    self.last_start_time: float | None = None  # of the newest `start` event: a launch that got as far as training
    self.end_state: str | None = None  # "stopped" or "failed" when the newest launch ended short of total_steps
    self._listed_at = -math.inf
    self._series_cache: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}

  def refresh(self) -> None:
    """Reads whatever was appended since the last refresh; lists checkpoints and samples every
    `LISTING_INTERVAL_S` (and on the first call)."""
    with self._read_lock, _gc_paused:
      for records in self.metrics_tail.read_new():
        with self.lock:
          if self.metrics_tail.reset:
            self.columns = MetricColumns()
            self._series_cache.clear()
            self.metrics_tail.reset = False
          self.columns.append(records)
      for records in self.events_tail.read_new():
        with self.lock:
          if self.events_tail.reset:
            self.events.clear()
            self.skipped.clear()
            self.last_checkpoint = None
            self.last_start_time = None
            self.end_state = None
            self.events_tail.reset = False
          self._add_events(records)
      now = time.monotonic()
      if now - self._listed_at >= LISTING_INTERVAL_S:
        self._listed_at = now
        checkpoint_step, samples, errors = self._list_checkpoint_step(), self._list_samples(), self._read_errors()
        with self.lock:
          self.listed_checkpoint_step, self.samples, self.process_errors = checkpoint_step, samples, errors
    self.loaded.set()

  def _add_events(self, records: Sequence[dict[str, Any]]) -> None:
    total = self.skipped[-1][2] if self.skipped else 0.0
    for record in records:
      self.events.append(record)
      event = record.get("event")
      if event == "skipped_sample":
        count = _as_float(record.get("count", 1))
        total += count if math.isfinite(count) else 1.0
        self.skipped.append((_as_float(record.get("step")), _as_float(record.get("time")), total))
      elif event == "checkpoint_saved":
        self.last_checkpoint = {"step": record.get("step"), "time": record.get("time")}
      elif event == "start" and math.isfinite(_as_float(record.get("time"))):
        self.last_start_time = _as_float(record.get("time"))
        self.end_state = None
      elif event in _STOP_EVENTS:
        self.end_state = _STOP_EVENTS[event]

  def _ls(self, path: str) -> list[str]:
    """What `path` holds now: gcsfs (like other fsspec filesystems of object stores) would otherwise answer from the
    listing it made the first time, and never show a checkpoint or sample saved since."""
    self.fs.invalidate_cache(path)
    return self.fs.ls(path, detail=False)

  def _list_checkpoint_step(self) -> int | None:
    try:
      names = [posixpath.basename(p.rstrip("/")) for p in self._ls(f"{self.root}/checkpoints")]
    except (FileNotFoundError, NotADirectoryError):
      return None
    steps = [int(n) for n in names if n.isdigit()]
    return max(steps) if steps else None

  def _read_errors(self) -> list[dict[str, Any]]:
    """The errors that stopped processes of the run (`errors/process_<I>.json`, one per process: its latest),
    oldest first: on a pod the first process to fail usually holds the cause, the others failing on losing it. A file
    that cannot be read or parsed is shown as an error saying so (last: it has no time)."""
    try:
      listed = self._ls(f"{self.root}/{storage.ERRORS_DIR}")
    except (FileNotFoundError, NotADirectoryError):
      return []
    found = []
    for path in listed:
      match = storage.PROCESS_ERROR_FILE.match(posixpath.basename(path.rstrip("/")))
      if not match:
        continue
      entry: dict[str, Any] = {"process": int(match.group(1)), "time": None, "host": None, "pid": None, "step": None}
      try:
        with self.fs.open(path, "rb") as f:
          record = orjson.loads(f.read(MAX_ERROR_FILE_BYTES + 1))
        if not isinstance(record, dict):
          raise ValueError(f"not a JSON object: {type(record).__name__}")
      except FileNotFoundError:  # deleted since it was listed
        continue
      except (OSError, ValueError) as error:  # orjson.JSONDecodeError is a ValueError
        entry["message"] = (f"errors/{posixpath.basename(path)} could not be read ({type(error).__name__}: "
                            f"{error}); read it in the run directory")
        found.append(entry)
        continue
      for key, kind in (("time", float), ("step", float), ("pid", float), ("host", str), ("message", str)):
        value = record.get(key)
        if isinstance(value, kind) or (kind is float and isinstance(value, int) and not isinstance(value, bool)):
          entry[key] = value
      entry.setdefault("message", "")
      found.append(entry)
    return sorted(found, key=lambda e: (e["time"] is None, e["time"] or 0.0, e["process"]))

  def _list_samples(self, max_steps: int = 3) -> list[dict[str, Any]]:
    try:
      entries = self._ls(f"{self.root}/samples")
    except (FileNotFoundError, NotADirectoryError):
      return []
    step_dirs = []
    for entry in entries:
      match = _STEP_DIR.match(posixpath.basename(entry.rstrip("/")))
      if match:
        step_dirs.append((int(match.group(1)), posixpath.basename(entry.rstrip("/"))))
    result = []
    for step, dirname in sorted(step_dirs, reverse=True)[:max_steps]:
      items: dict[str, dict[str, Any]] = {}
      try:
        listed = sorted(self._ls(f"{self.root}/samples/{dirname}"))
      except (FileNotFoundError, NotADirectoryError):  # deleted since the samples directory was listed
        continue
      for listed_path in listed:
        filename = posixpath.basename(listed_path)
        path = self._servable(f"samples/{dirname}/{filename}")  # what `open_sample` would serve, and only that
        if path is None:
          continue
        stem, ext = posixpath.splitext(filename)
        if ext == ".txt":
          try:
            with self.fs.open(path, "rb") as f:
              entry = {"text": f.read(MAX_SAMPLE_TEXT_BYTES).decode("utf-8", errors="replace")}
          except FileNotFoundError:  # deleted since it was listed
            continue
        else:
          entry = {"audio" if ext == ".wav" else "image": f"samples/{dirname}/{filename}"}
        items.setdefault(stem, {"name": stem}).update(entry)
      result.append({"step": step, "items": list(items.values())})
    return result

  def series(self, keys: Sequence[str], max_points: int) -> dict[str, Any]:
    """Downsampled {key: {"step", "time", "value"}} for each key (empty lists for unknown keys)."""
    return self.metrics_payload(keys, max_points)["series"]

  def metrics_payload(self, keys: Sequence[str], max_points: int) -> dict[str, Any]:
    """The `/api/metrics` answer: the series of `keys`, the rows read and whether the first read is still going."""
    with self.lock:
      # Checked under the lock: `loaded` is set only after the last chunk of the first read was added.
      loading = not self.loaded.is_set()
      series = {key: self._one_series(key, max_points) for key in keys}
      return {"run": self.name, "rows": self.columns.rows, "loading": loading, "series": series}

  def _one_series(self, key: str, max_points: int) -> dict[str, Any]:
    """{"step", "time", "value"} of the finite points, downsampled, and under "nonfinite" the latest `max_points`
    steps at which `key` was logged non-finite ({"step", "time", "value": "nan", "inf" or "-inf"})."""
    cache_key = (key, max_points)
    rows = self.columns.rows
    cached = self._series_cache.get(cache_key)
    if cached and cached[0] == (rows, len(self.skipped)):
      return cached[1]
    nonfinite_rows, nonfinite_values = np.zeros(0, np.intp), np.zeros(0)
    if key == "skipped_samples":
      rows_so_far = list(self.skipped)
      steps, times = self.columns.column("step"), self.columns.column("time")
      if rows_so_far and steps.size and np.isfinite(steps[-1]) and steps[-1] > rows_so_far[-1][0]:
        # The count holds until now: one more point at the latest step draws it up to the present.
        rows_so_far.append((float(steps[-1]), float(times[-1]), rows_so_far[-1][2]))
      table = np.array(rows_so_far, dtype=np.float64).reshape(-1, 3)
      step, wall, value = table[:, 0], table[:, 1], table[:, 2]
    else:
      step, wall, value = self.columns.column("step"), self.columns.column("time"), self.columns.column(key)
      nonfinite_rows, nonfinite_values = self.columns.nonfinite(key)
    logged = np.isfinite(value)
    logged[nonfinite_rows] = True
    keep = np.flatnonzero(logged & np.isfinite(step))
    # Finite and non-finite points together: a relaunch's finite value replaces a non-finite one of the stopped run.
    keep = keep[_not_superseded(step[keep])]
    marked = np.isin(nonfinite_rows, keep[~np.isfinite(value[keep])])
    nonfinite_rows, nonfinite_values = nonfinite_rows[marked][-max_points:], nonfinite_values[marked][-max_points:]
    keep = keep[np.isfinite(value[keep])]
    picks = keep[downsample_indices(keep.size, value[keep], max_points)]
    result = {"step": step[picks], "time": wall[picks], "value": value[picks],
              "nonfinite": {"step": step[nonfinite_rows], "time": wall[nonfinite_rows],
                            "value": [_nonfinite_name(v) for v in nonfinite_values.tolist()]}}
    self._series_cache[cache_key] = ((rows, len(self.skipped)), result)
    return result

  def status(self, now: float) -> dict[str, Any]:
    """Current step, ETA, samples seen, last checkpoint, time since the last metric and staleness."""
    with self.lock:
      columns = self.columns
      # The recent lines decide the rate and staleness; looking only at the tail keeps this cheap for long runs.
      step, wall = columns.column("step")[-4096:], columns.column("time")[-4096:]
      timed = np.flatnonzero(np.isfinite(step) & np.isfinite(wall))
      # The latest value logged for each key: a number, or "nan", "inf" or "-inf" when that value was not finite
      # (its step in `nonfinite`): the last finite value instead would hide a diverged run.
      latest: dict[str, float | str] = {}
      finite: dict[str, float] = {}
      nonfinite: dict[str, float | None] = {}
      all_steps = columns.column("step")
      for key in columns.names():
        column = columns.column(key)
        row = _last_finite_row(column)
        if row is not None:
          latest[key] = finite[key] = float(column[row])
        nonfinite_rows, nonfinite_values = columns.nonfinite(key)
        if nonfinite_rows.size and (row is None or nonfinite_rows[-1] > row):
          latest[key] = _nonfinite_name(float(nonfinite_values[-1]))
          at = float(all_steps[nonfinite_rows[-1]])
          nonfinite[key] = at if math.isfinite(at) else None
      result: dict[str, Any] = {
          "name": self.name, "url": self.url, "rows": columns.rows, "loading": not self.loaded.is_set(),
          "error": self.error, "keys": columns.names(),
          "latest": latest, "nonfinite": nonfinite, "nonfinite_lines": columns.nonfinite_rows(),
          "step": finite.get("step"), "total_steps": finite.get("total_steps"),
          "samples_seen": finite.get("samples_seen"), "skipped_samples": self.skipped[-1][2] if self.skipped else 0,
          "last_checkpoint": self.last_checkpoint, "listed_checkpoint_step": self.listed_checkpoint_step,
          "bad_lines": self.metrics_tail.bad_lines, "steps_per_sec": None, "eta_seconds": None,
          "last_metric_time": None, "seconds_since_metric": None, "stale": True,
          # An error older than the newest `start` event is of a launch before the one that got to training since.
          "process_errors": [{**e, "earlier_launch": self._before_last_start(e["time"])} for e in self.process_errors],
      }
      result["failed_processes"] = sum(not e["earlier_launch"] for e in result["process_errors"])
      if timed.size:
        last_time = float(wall[timed[-1]])
        result["last_metric_time"] = last_time
        result["seconds_since_metric"] = max(0.0, now - last_time)
        recent = _current_launch(step[timed], wall[timed], self.last_start_time)[-RATE_WINDOW_LINES:]
        recent = timed[recent]
        intervals = np.diff(wall[recent])
        typical = float(np.median(intervals)) if intervals.size else 0.0
        result["stale"] = now - last_time > max(MIN_STALE_S, STALE_INTERVALS * typical)
        span = wall[recent[-1]] - wall[recent[0]]
        rate = (step[recent[-1]] - step[recent[0]]) / span if span > 0 else finite.get("steps_per_sec")
        if rate and rate > 0:
          result["steps_per_sec"] = float(rate)
          if result["total_steps"] is not None and result["step"] is not None:
            result["eta_seconds"] = max(0.0, (result["total_steps"] - result["step"]) / rate)
      result["state"] = self._state(result)
      if result["state"] not in ("live", "stale"):
        # A run that is not training: no rate to go on with, nothing to finish, and no silence to alarm about.
        result.update(steps_per_sec=None, eta_seconds=None, stale=False)
      return result

  def _state(self, status: dict[str, Any]) -> str:
    """"failed" (the newest launch stopped on an error), "finished" (at total_steps), "stopped" (on request, short
    of total_steps), else "stale" or "live". Failed comes first: a run whose last save failed at its last step
    has no checkpoint of it."""
    if self.end_state == "failed" or status["failed_processes"]:
      return "failed"
    if status["step"] is not None and status["total_steps"] is not None and status["step"] >= status["total_steps"]:
      return "finished"
    if self.end_state == "stopped":
      return "stopped"
    return "stale" if status["stale"] else "live"

  def _before_last_start(self, when: float | None) -> bool:
    return when is not None and self.last_start_time is not None and when < self.last_start_time

  def recent_events(self, limit: int) -> list[dict[str, Any]]:
    with self.lock:
      return list(self.events)[-limit:]

  def sample_listing(self) -> list[dict[str, Any]]:
    with self.lock:
      return list(self.samples)

  def _servable(self, relpath: str) -> str | None:
    """The path to read `samples/...` file `relpath` at, or None if it is not a file the dashboard may show."""
    parts = relpath.split("/")
    if len(parts) < 2 or parts[0] != "samples" or not all(_SAFE_COMPONENT.match(p) for p in parts):
      return None
    if posixpath.splitext(parts[-1])[1] not in _SAMPLE_KINDS:
      return None
    path = f"{self.root}/{relpath}"
    if _is_local(self.fs):
      # A symlink inside the run directory may point anywhere; only files that really live inside are shown.
      root = os.path.realpath(self.root)
      real = os.path.realpath(path)
      if not real.startswith(root + os.sep) or not os.path.isfile(real):
        return None
      path = real
    return path

  def open_sample(self, relpath: str) -> tuple[bytes, str] | None:
    """Bytes and content type of `samples/...` file `relpath`, or None if it is not a servable file."""
    path = self._servable(relpath)
    if path is None:
      return None
    content_type = _SAMPLE_KINDS[posixpath.splitext(relpath)[1]]
    try:
      with self.fs.open(path, "rb") as f:
        return f.read(), content_type
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
      return None


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
  return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _run_names(urls: Sequence[str]) -> list[str]:
  names = []
  for url in urls:
    base = posixpath.basename(url.rstrip("/")) or url
    name, suffix = base, 2
    while name in names:
      name, suffix = f"{base}-{suffix}", suffix + 1
    names.append(name)
  return names


def _prometheus_escape(value: str) -> str:
  return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _prometheus_value(value: float) -> str:
  """`value` as the Prometheus text format spells it: NaN, +Inf and -Inf for the non-finite ones."""
  if math.isnan(value):
    return "NaN"
  if math.isinf(value):
    return "+Inf" if value > 0 else "-Inf"
  return repr(value)


class UnreachableRunError(RuntimeError):
  """A run directory's storage did not answer (no network, no credentials): not the same as a missing directory."""


class Dashboard:
  """The runs being watched and the answers of the JSON and Prometheus endpoints."""

  def __init__(self, run_urls: Sequence[str]):
    if not run_urls:
      raise ValueError("at least one run directory is needed")
    for url in run_urls:
      fs, path = fsspec.core.url_to_fs(url)
      try:  # not fs.isdir, which answers False for a storage it cannot reach as for a missing directory
        is_dir = fs.info(path)["type"] == "directory"
      except FileNotFoundError:
        is_dir = False
      except Exception as error:
        raise UnreachableRunError(f"cannot read {url} ({type(error).__name__}: {error}): check the network and "
                                  "the credentials") from error
      if not is_dir:
        raise FileNotFoundError(f"run directory not found: {url}")
    self.runs = [RunState(url, name) for url, name in zip(run_urls, _run_names(run_urls), strict=True)]
    self._stop = threading.Event()
    self._threads: list[threading.Thread] = []

  def start(self) -> None:
    """Starts one background thread per run that reads its files now and every `REFRESH_INTERVAL_S` after."""
    for run in self.runs:
      thread = threading.Thread(target=self._keep_fresh, args=(run,), name=f"dashboard-{run.name}", daemon=True)
      thread.start()
      self._threads.append(thread)

  def stop(self) -> None:
    """Stops the background threads (a read in progress finishes its current chunk first)."""
    self._stop.set()
    for thread in self._threads:
      thread.join(timeout=10)

  def _keep_fresh(self, run: RunState) -> None:
    while not self._stop.is_set():
      try:
        run.refresh()
        run.error = None
      except Exception as error:  # noqa: BLE001 - a failed read (network, permissions) is retried, not fatal
        message = f"{type(error).__name__}: {error}"
        if message != run.error:
          print(f"dashboard: reading {run.url} failed, retrying every {REFRESH_INTERVAL_S} s: {message}",
                file=sys.stderr, flush=True)
        run.error = message
      self._stop.wait(REFRESH_INTERVAL_S)

  def _wait_loaded(self, runs: Sequence[RunState]) -> None:
    """Lets a request wait up to `FIRST_LOAD_WAIT_S` (in all) for the first read of `runs` to finish."""
    deadline = time.monotonic() + FIRST_LOAD_WAIT_S
    for run in runs:
      run.loaded.wait(max(0.0, deadline - time.monotonic()))

  def run(self, index: str | int) -> RunState | None:
    try:
      i = int(index)
    except (TypeError, ValueError):
      return None
    if not 0 <= i < len(self.runs):
      return None
    self._wait_loaded([self.runs[i]])
    return self.runs[i]

  def runs_payload(self) -> dict[str, Any]:
    self._wait_loaded(self.runs)
    now = time.time()
    statuses = []
    for i, run in enumerate(self.runs):
      statuses.append({"index": i, **run.status(now)})
    return {"now": now, "runs": statuses}

  def prometheus_text(self) -> str:
    """Latest value of every numeric metric per run, in the Prometheus text exposition format.

    Written by hand rather than with prometheus_client: a dozen gauges do not justify a runtime dependency.
    """
    self._wait_loaded(self.runs)
    now = time.time()
    families: dict[str, list[tuple[str, float]]] = {}  # name -> (labels, value)
    for run in self.runs:
      status = run.status(now)
      # float() reads "nan", "inf" and "-inf" too: a diverged run's loss is exported as NaN, for an alert to see.
      values = {f"echo_{_PROM_NAME_BAD.sub('_', key)}": value for key, value in status["latest"].items()}
      values["echo_nonfinite_lines_total"] = status["nonfinite_lines"]
      values["echo_skipped_samples_total"] = status["skipped_samples"]
      values["echo_stale"] = float(status["stale"])
      values["echo_failed_processes"] = status["failed_processes"]
      for key in ("seconds_since_metric", "eta_seconds", "steps_per_sec"):
        if status[key] is not None:
          values[f"echo_run_{key}"] = status[key]
      checkpoint = (status["last_checkpoint"] or {}).get("step", status["listed_checkpoint_step"])
      if isinstance(checkpoint, int | float):
        values["echo_last_checkpoint_step"] = checkpoint
      labels = f'run="{_prometheus_escape(run.name)}"'
      for name, value in values.items():
        families.setdefault(name, []).append((labels, float(value)))
      # One series per state, 1 for the run's (as a state set): an alert can tell a failed run from a finished one.
      for state in RUN_STATES:
        families.setdefault("echo_run_state", []).append(
            (f'{labels},state="{state}"', float(status["state"] == state)))
    lines = []
    for name in sorted(families):
      lines.append(f"# TYPE {name} gauge")
      lines.extend(f"{name}{{{labels}}} {_prometheus_value(value)}" for labels, value in families[name])
    return "\n".join(lines) + "\n"


def _load_page_assets() -> dict[str, tuple[bytes, str]]:
  """The page files by URL path; only these exact paths are ever served from the page directory."""
  assets = {}
  for dirpath, _, filenames in os.walk(PAGE_DIR):
    for filename in filenames:
      ext = posixpath.splitext(filename)[1]
      if ext not in _PAGE_TYPES:
        continue
      full = os.path.join(dirpath, filename)
      rel = os.path.relpath(full, PAGE_DIR).replace(os.sep, "/")
      with open(full, "rb") as f:
        assets["/" if rel == "index.html" else f"/static/{rel}"] = (f.read(), _PAGE_TYPES[ext])
  if "/" not in assets:
    raise FileNotFoundError(f"dashboard page missing: {PAGE_DIR}/index.html")
  return assets


class DashboardHandler(http.server.BaseHTTPRequestHandler):
  """Routes GET requests; anything not explicitly served is a 404."""

  dashboard: Dashboard
  assets: dict[str, tuple[bytes, str]]
  bind_host: str
  host_names: frozenset[str]  # besides loopback ones, the Host names answered (`_host_names`)
  server_version = "echo-monitor"
  sys_version = ""

  def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
    # One line per poll every 1.5 s would drown the terminal; errors still go through log_error.
    del format, args

  def do_GET(self) -> None:  # noqa: N802 - name fixed by the base class
    if not self._host_allowed():
      return self._send(403, b"forbidden: the Host header names another server; open the page at localhost (an ssh -L "
                        b"tunnel), at the address monitor.py was given with --host, or at this machine's name or IP "
                        b"address when it listens on all (--host 0.0.0.0)\n", "text/plain; charset=utf-8")
    url = urllib.parse.urlsplit(self.path)
    query = urllib.parse.parse_qs(url.query)
    path = url.path
    try:
      if path in self.assets:
        body, content_type = self.assets[path]
        self._send(200, body, content_type)
      elif path == "/api/runs":
        self._send_json(self.dashboard.runs_payload())
      elif path == "/api/metrics":
        self._metrics(query)
      elif path == "/api/events":
        self._events(query)
      elif path == "/api/samples":
        run = self.dashboard.run(_first(query, "run"))
        if run is None:
          return self._not_found()
        self._send_json({"run": run.name, "steps": run.sample_listing()})
      elif path == "/metrics":
        self._send(200, self.dashboard.prometheus_text().encode(), "text/plain; version=0.0.4; charset=utf-8")
      elif path.startswith("/files/"):
        self._file(path[len("/files/"):])
      else:
        self._not_found()
    except (BrokenPipeError, ConnectionResetError):
      pass

  def _host_allowed(self) -> bool:
    """Whether the Host header names this server. DNS rebinding: a page of attacker.example can make its name resolve
    to 127.0.0.1 and then read this server as its own origin (the browser sends "Host: attacker.example"), so only
    loopback names and `host_names` (`_host_names`) are answered, and on a wildcard bind any IP address: an IP address
    cannot be rebound."""
    try:
      hostname = urllib.parse.urlsplit(f"//{self.headers.get('Host', '')}").hostname
    except ValueError:  # a malformed [IPv6] literal
      return False
    if not hostname:
      return False
    return (_is_loopback(hostname) or hostname in self.host_names
            or (_is_wildcard(self.bind_host) and _ip_address(hostname) is not None))

  def _metrics(self, query: dict[str, list[str]]) -> None:
    run = self.dashboard.run(_first(query, "run"))
    if run is None:
      return self._not_found()
    keys = [k for k in _first(query, "keys", "loss").split(",") if k]
    try:
      max_points = min(MAX_POINTS, int(_first(query, "max_points", str(MAX_POINTS))))
      if max_points < 4:
        raise ValueError
    except ValueError:
      return self._send(400, b"max_points must be an integer >= 4\n", "text/plain; charset=utf-8")
    self._send_json(run.metrics_payload(keys, max_points))

  def _events(self, query: dict[str, list[str]]) -> None:
    run = self.dashboard.run(_first(query, "run"))
    if run is None:
      return self._not_found()
    try:
      limit = max(1, min(MAX_EVENTS_KEPT, int(_first(query, "limit", "100"))))
    except ValueError:
      return self._send(400, b"limit must be an integer\n", "text/plain; charset=utf-8")
    self._send_json({"run": run.name, "events": run.recent_events(limit)})

  def _file(self, rest: str) -> None:
    index, _, relpath = rest.partition("/")
    run = self.dashboard.run(index)
    # Decoded exactly once: a double-encoded "%252e" stays "%2e", which no safe path component contains.
    found = run.open_sample(urllib.parse.unquote(relpath)) if run else None
    if found is None:
      return self._not_found()
    self._send(200, *found)

  def _not_found(self) -> None:
    self._send(404, b"not found\n", "text/plain; charset=utf-8")

  def _send_json(self, payload: Any) -> None:
    self._send(200, _json_bytes(payload), "application/json")

  def _send(self, code: int, body: bytes, content_type: str) -> None:
    self.send_response(code)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    self.send_header("X-Content-Type-Options", "nosniff")
    self.send_header("Content-Security-Policy", _PAGE_CSP)
    self.end_headers()
    self.wfile.write(body)


def _first(query: dict[str, list[str]], key: str, default: str = "") -> str:
  values = query.get(key)
  return values[0] if values else default


class DashboardServer(http.server.ThreadingHTTPServer):
  """The HTTP server of a `Dashboard`; closing it also stops the dashboard's background reads."""

  daemon_threads = True

  def __init__(self, dashboard: Dashboard, address: tuple[str, int], handler: type[DashboardHandler]):
    self.dashboard = dashboard  # first: a failed bind calls server_close from within super().__init__
    super().__init__(address, handler)

  def server_close(self) -> None:
    self.dashboard.stop()
    super().server_close()


def make_server(run_urls: Sequence[str], host: str = "127.0.0.1", port: int = 8080) -> DashboardServer:
  """A dashboard server over `run_urls`, not yet serving but already reading the runs; port 0 picks a free port.

  The runs are read in the background from now on, so a page opened right after start gets an answer at once: while
  a large history is still being read, answers carry `"loading": true` and the lines read so far.
  """
  dashboard = Dashboard(run_urls)
  handler = type("BoundDashboardHandler", (DashboardHandler,),
                 {"dashboard": dashboard, "assets": _load_page_assets(), "bind_host": host,
                  "host_names": _host_names(host)})
  server = DashboardServer(dashboard, (host, port), handler)
  dashboard.start()
  return server


def serve_message(host: str, port: int) -> str:
  """What `serve` prints: the URL, and how to open the page from another machine. An ssh tunnel keeps it private;
  cloudflared runs here, beside this server (it forwards to this machine's localhost), and publishes the page; it
  passes on the public host name as the Host header unless told which to send, and the Host check refuses that one."""
  lines = [f"Dashboard: http://{host}:{port}/",
           f"Private, from your machine: ssh -L {port}:localhost:{port} {socket.gethostname()}, then open "
           f"http://localhost:{port}/",
           f"Public (anyone with the URL can open it), run on this machine: cloudflared tunnel --url "
           f"http://localhost:{port} --http-host-header localhost:{port}"]
  if not _is_loopback(host):
    lines.append(f"Warning: bound to {host}, not loopback: anyone who can reach this machine on port {port} can open "
                 "the page.")
  return "\n".join(lines)


def _ip_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
  try:
    return ipaddress.ip_address(host.strip("[]"))
  except ValueError:  # a host name
    return None


def _is_loopback(host: str) -> bool:
  address = _ip_address(host)  # a host name, whatever it resolves to, is not the loopback name
  return host == "localhost" or (address is not None and address.is_loopback)


def _is_wildcard(host: str) -> bool:
  return host in ("0.0.0.0", "::", "")


def _host_names(bind_host: str) -> frozenset[str]:
  """The Host names a server bound to `bind_host` answers besides loopback ones: that address, and on a wildcard bind
  this machine's own names (the page is opened at a pod worker's name; no attacker's page can rebind it). Asked once:
  `getfqdn` may wait on DNS."""
  names = {bind_host.strip("[]").lower()}
  if _is_wildcard(bind_host):
    names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
  return frozenset(names)


def serve(run_urls: Sequence[str], host: str = "127.0.0.1", port: int = 8080) -> None:
  """Serves the dashboard until interrupted, after printing the URL and how to open it from another machine."""
  server = make_server(run_urls, host, port)
  bound_port = server.server_address[1]
  print(serve_message(host, bound_port), flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
