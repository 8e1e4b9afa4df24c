"""A local cache of remote shards, fetched ahead of the reader and deleted once read (DESIGN §6).

Every shard URL goes through fsspec, so local paths, `gs://`, `hf://datasets/org/name/...` (huggingface_hub
registers its HfFileSystem as `hf://` and reads the token from HF_TOKEN or the saved login itself; it never appears
on a command line or in a log) and any other filesystem take the same path. Local shards are read in place.

A remote shard is downloaded to `<name>.partial` and renamed to `<name>` when complete, so a half-written file never
looks finished. A download that fails, or makes no progress for `stall_timeout` seconds, is abandoned and retried
after a growing, jittered wait (so that the hosts of a pod do not retry a rate-limited Hub in step), from the bytes
the attempts before it wrote (unless the file was replaced meanwhile: then from its start); each failed attempt is
logged with its cause. A failed or stalled download is retried whether the reader waits for it or not (a shard
fetched ahead is retried in the background). After `retries` failed
attempts the shard is reported unreadable and the reader goes on without it. A failure to write the cache itself (a
full or read-only disk) is no fault of the shard: it stops the reader with an error naming the directory. Once read,
a shard is marked `<name>.consumed` and deleted, so the disk watchdog can also clean up after a crash between the two
steps.

fsspec's own caching filesystems ("filecache", "blockcache") keep what they fetched and neither prefetch nor
time out a stalled read, which is why this module exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO

import fsspec
from absl import logging

from echo_jax.data import hf_urls

CHUNK_BYTES = 1 << 20
# The most bytes asked for per request. gcsfs's and huggingface_hub's files read 5 MB ranges by default: some 200
# requests per GB of shards, per host and stream, and the Hub limits those per account and 5-minute window across
# every host of a pod (5,000 for a free account). A download holds one block in memory (prefetch + 1 per stream).
# huggingface_hub's streaming file (block_size=0) would take one request per shard, but its version pinned here opens
# a new request for each read after the first.
DOWNLOAD_BLOCK_BYTES = 32 << 20
# A request's answer arrives whole (gcsfs and huggingface_hub read the body before returning any of it), so a download
# shows progress once per block: a block that takes longer than stall_timeout on a slow but live link was abandoned,
# retried from the same offset with the same block, and never arrived (below 32 MiB per 120 s, 2.3 Mbit/s, no shard
# did). So the first request of an attempt asks for FIRST_BLOCK_BYTES, and each next one for what the last one's rate
# brings in BLOCK_TIME_FRACTION of stall_timeout, between CHUNK_BYTES and DOWNLOAD_BLOCK_BYTES: a fast link still
# asks for 32 MiB per request, and a link has to be 8 times slower than its last block to stall.
FIRST_BLOCK_BYTES = 4 << 20
BLOCK_TIME_FRACTION = 1 / 8
PARTIAL_SUFFIX = ".partial"
CONSUMED_SUFFIX = ".consumed"
# The fields of fsspec's `info()` that tell one version of a file from another: GCS's generation, an ETag (S3, HTTP),
# an MD5, a Hub file's blob id, a modification or creation time. The first one present is compared, with the size.
_VERSION_FIELDS = ("generation", "ETag", "etag", "md5Hash", "blob_id", "mtime", "LastModified", "created")
# Tries at making a cache's directory and locking it, each failed by a removal (`remove_unclaimed`) of it or its
# parent in between; a directory that cannot be made at all fails them all at once.
CLAIM_TRIES = 10
# The wait before a shard's n-th retry is about retry_wait * 2**(n-1) seconds, at most this.
MAX_RETRY_WAIT_S = 60.0


def next_block_bytes(received: int, seconds: float, stall_timeout: float) -> int:
  """The bytes to ask for next, after a block of `received` bytes took `seconds` (see FIRST_BLOCK_BYTES)."""
  wanted = received / max(seconds, 1e-3) * stall_timeout * BLOCK_TIME_FRACTION
  return int(min(DOWNLOAD_BLOCK_BYTES, max(CHUNK_BYTES, wanted)))


def is_local(url: str) -> bool:
  """True for a path on this machine's filesystem, which is read in place."""
  # From the URL alone: making the filesystem would, for gs://, look for credentials (15 s without a network).
  return fsspec.utils.get_protocol(url) in ("file", "local")


def describe(error: BaseException, limit: int = 500) -> str:
  """`error` in one line, for logs and events: its type and message, its lines joined (gcsfs puts GCS's own reason,
  such as the permission it denied, on the line after the URL), at most `limit` characters (fsspec's errors name
  URLs, never tokens)."""
  return " ".join(line.strip() for line in f"{type(error).__name__}: {error}".splitlines() if line.strip())[:limit]


# HTTP statuses that a retry may get past: a request timeout, a rate limit, and the server's own failures (5xx).
_TRANSIENT_STATUSES = (408, 429)
# Module -> its exception classes for a connection lost, refused or timed out. Looked up only in modules already
# imported: an error of a library that was never imported cannot have been raised.
_TRANSPORT_ERRORS = {
    "requests.exceptions": ("ConnectionError", "Timeout", "ChunkedEncodingError"),
    "aiohttp": ("ClientConnectionError", "ClientPayloadError"),
    "httpx": ("TransportError",),
}


# gcsfs (2026.7.0, gcsfs/retry.py) raises some statuses as plain errors that carry none, told by their message's start:
# a 403 as OSError("Forbidden: ..."), a 400 that says "invalid" as ValueError("Bad Request: ...").
_GCSFS_STATUS_MESSAGES = ((OSError, "Forbidden: ", 403), (ValueError, "Bad Request: ", 400))


def _http_status(error: BaseException) -> int | None:
  """The HTTP status that `error` carries (gcsfs's HttpError.code, aiohttp's .status, requests' and httpx's
  .response.status_code, which huggingface_hub's errors hold, or gcsfs's message for the errors it raises without
  one), or None."""
  response = getattr(error, "response", None)
  for status in (getattr(error, "code", None), getattr(error, "status", None), getattr(response, "status_code", None)):
    if isinstance(status, int) or (isinstance(status, str) and status.isdigit()):
      return int(status)
  for kind, start, status in _GCSFS_STATUS_MESSAGES:
    if type(error) is kind and str(error).startswith(start):
      return status
  return None


def is_transient(error: BaseException) -> bool:
  """Whether a retry may get past `error`: a connection lost or refused, a timeout, HTTP 408, 429 or 5xx. A missing
  file, a refused permission or anything not known to pass is not."""
  status = _http_status(error)
  if status is not None:
    return status >= 500 or status in _TRANSIENT_STATUSES
  if isinstance(error, (ConnectionError, TimeoutError)):
    return True
  for module_name, names in _TRANSPORT_ERRORS.items():
    module = sys.modules.get(module_name)
    if module is not None and isinstance(error, tuple(getattr(module, name) for name in names)):
      return True
  return False


# HTTP statuses that no retry gets past: a bad request, no credentials, no permission, nothing there.
_PERMANENT_STATUSES = (400, 401, 403, 404, 410)


def is_permanent(error: BaseException) -> bool:
  """Whether no retry can get past `error`: a missing file, a refused permission, HTTP 400, 401, 403, 404 or 410.
  The shard cache gives up on such a shard at once: with data.download_retries attempts and their waits (about 1-2
  minutes with the default 8), a missing or forbidden shard (an expired token: every one) held the pod's steps.
  Anything else (a connection lost, a download cut short, an unknown error) may pass on a retry."""
  status = _http_status(error)
  if status is not None:
    return status in _PERMANENT_STATUSES
  return isinstance(error, (FileNotFoundError, PermissionError))


def retry_wait_s(attempt: int, first_wait: float, error: BaseException | None = None) -> float:
  """Seconds to wait after failed attempt `attempt` (from 1): about first_wait * 2**(attempt-1), at most
  MAX_RETRY_WAIT_S, jittered so that the hosts of a pod do not retry a rate-limited store in step; or longer, up to
  MAX_RATE_LIMIT_WAIT_S, when `error` is a rate limit that says when it lifts (`rate_limit_wait_s`)."""
  wait = min(first_wait * 2 ** (attempt - 1), MAX_RETRY_WAIT_S) * random.uniform(0.5, 1.0)
  asked = rate_limit_wait_s(error) if error is not None else None
  return wait if asked is None else min(max(wait, asked * random.uniform(1.0, 1.2)), MAX_RATE_LIMIT_WAIT_S)


# The Hub counts requests in 5-minute windows: a rate limit lifts within that.
MAX_RATE_LIMIT_WAIT_S = 330.0
_RATE_LIMIT_RESET = re.compile(r"(?:^|;)\s*t=(\d+)")


def rate_limit_wait_s(error: BaseException) -> float | None:
  """The seconds a rate-limited store asked to wait with its HTTP 429 (`Retry-After`, or the `t=` of the IETF draft's
  `RateLimit` header, which the Hub sends: the seconds until its window resets), or None. The default waits add up
  to about two minutes over data.download_retries: a pod over the Hub's per-account limit would give up on shards,
  their samples skipped, a minute or more before the limit lifts."""
  if _http_status(error) != 429:
    return None
  headers = getattr(getattr(error, "response", None), "headers", None) or {}
  retry_after = str(headers.get("Retry-After", "")).strip()
  if retry_after.isdigit():
    return float(retry_after)
  reset = _RATE_LIMIT_RESET.search(str(headers.get("RateLimit", "")))
  return float(reset.group(1)) if reset else None


class CacheWriteError(OSError):
  """The shard cache's own directory cannot be written (full or read-only disk): no retry can help."""


@contextlib.contextmanager
def _cache_writes() -> Iterator[None]:
  """An OSError inside is the cache's own disk failing, told apart from the network's errors as CacheWriteError."""
  try:
    yield
  except OSError as error:
    raise CacheWriteError(f"cannot write the shard cache: {describe(error)}") from error


def is_gcs(fs: fsspec.AbstractFileSystem) -> bool:
  """Whether `fs` is gcsfs's, whose objects have generations; gcsfs is imported already where it is, and is not
  imported for another filesystem."""
  core = sys.modules.get("gcsfs.core")
  return core is not None and isinstance(fs, core.GCSFileSystem)


def _info_now(fs: fsspec.AbstractFileSystem, path: str) -> dict:
  """fsspec's `info()` of the file `path`, asked of the store now, past the listings the filesystem keeps. gcsfs's
  `info`, its listing forgotten, asks for the object and lists its directory at once: its own object request alone
  is asked for instead (one request, not two)."""
  fs.invalidate_cache(path)
  if is_gcs(fs):
    return fsspec.asyn.sync(fs.loop, fs._get_object, path)  # private: gcsfs 2026.7.0, pinned in constraints.txt
  return fs.info(path)


def _file_version(info: dict) -> tuple:
  """The version of a file, from its fsspec `info()`: its size and the first of _VERSION_FIELDS that it has."""
  field = next((name for name in _VERSION_FIELDS if info.get(name) is not None), None)
  return info.get("size"), field, None if field is None else str(info[field])


class _Download:
  """One shard's download: attempts run in daemon threads, since a stalled network read cannot be interrupted.

  An attempt goes on from where the one before it stopped (the bytes in `.partial`): a connection lost or stalled at
  900 MB of a GB shard costs the last 100 MB again, not the whole shard, with each retry. Unless the file was replaced
  meanwhile: each attempt asks the store for the file's version (`_file_version`: GCS's generation, ...) as it starts,
  and again once it has read the last byte; bytes of another version than the attempt's own are discarded and the
  file is downloaded again from its start, so that a shard replaced during its download is never the old one's first
  part spliced to the new one's rest (each request reads whatever version is there then). Not asked for an hf:// URL
  at a commit, whose files never change.

  A failed attempt is retried by the download itself, after its wait (`retry_wait_s`) on a timer's thread, whether a
  reader waits for the shard or not: a shard fetched ahead whose attempt failed early is then most often complete
  when the reader comes to it, where it used to wait for the reader before its retry, and the reader then for the
  retry. Likewise a stall: each attempt has a watch on a timer's thread (`_watch_stall`) that fails it once it has
  received nothing for `stall_timeout` seconds, so that a shard fetched ahead whose link stalled is retried then, not
  when the reader comes to it and waits for the whole retry (the reader checks too, `check_stall`, in case the
  watch's thread could not start). After `retries` attempts, or at
  once for an error that no retry can pass (`is_permanent`) or a CacheWriteError, the download is given up: `done`
  is set with its `cause`."""

  def __init__(self, url: str, path: str, stall_timeout: float, retries: int, retry_wait: float):
    self.url = url
    self.path = path
    self.stall_timeout = stall_timeout  # sizes the requests (`next_block_bytes`); `_watch_stall` enforces it
    self.retries = retries
    self.retry_wait = retry_wait
    self.done = threading.Event()  # set once the shard is at `path`, or given up (`cause`)
    self.error: BaseException | None = None  # the last failed attempt's error (None: it stalled)
    self.cause: str | None = None  # why the download was given up; None while it is not
    self.attempts = 0
    self.progress_time = time.monotonic()
    self._lock = threading.Lock()
    self._attempt_id = 0
    self._target = None  # the current attempt's open `.partial`, closed by `abandon`
    self._retry: threading.Timer | None = None  # the wait before the next attempt, while there is one
    self._watch: threading.Timer | None = None  # the current attempt's stall watch (`_watch_stall`)
    # The version of the file whose bytes `.partial` holds (None: unknown, as for bytes no attempt of this download
    # wrote, which in the cache's use there are none of: a launch deletes the `.partial` files an earlier one left).
    self._version: tuple | None = None

  def start(self) -> None:
    """Starts the first attempt."""
    with self._lock:
      self._start()

  def _start(self) -> None:
    """Starts a fresh attempt, under the lock; the attempts before it were abandoned and no longer touch the files."""
    self._attempt_id += 1
    self.attempts += 1
    self.error = None
    self._retry = None
    self.progress_time = time.monotonic()
    threading.Thread(target=self._run, args=(self._attempt_id,), name="echo-shard-download", daemon=True).start()
    self._start_watch(self.stall_timeout)

  def _timer(self, delay: float, function: Callable[[int], None]) -> threading.Timer:
    """Under the lock: calls `function(attempt id now)` in `delay` seconds on a daemon thread; raises RuntimeError
    when no thread can start."""
    timer = threading.Timer(delay, function, args=(self._attempt_id,))
    timer.daemon = True
    timer.start()
    return timer

  def _start_watch(self, delay: float) -> None:
    """Under the lock: the current attempt's stall is checked in `delay` seconds (`_watch_stall`)."""
    try:
      self._watch = self._timer(delay, self._watch_stall)
    except RuntimeError as failure:  # no thread to be had: the reader's `check_stall` still finds the stall
      logging.warning("the stall watch of shard %s could not start (%s)", self.url, describe(failure))
      self._watch = None

  def _stall_left(self, attempt_id: int) -> float | None:
    """Under the lock: the seconds until attempt `attempt_id` has received nothing for `stall_timeout` (at most 0: it
    has), or None when it does not run (abandoned, waiting to be retried, or done)."""
    if not self._current(attempt_id) or self._retry is not None or self.done.is_set():
      return None
    return self.progress_time + self.stall_timeout - time.monotonic()

  def _watch_stall(self, attempt_id: int) -> None:
    """The stall watch of attempt `attempt_id`, due when it would have received nothing for `stall_timeout` seconds:
    fails it then, or, when bytes came meanwhile, looks again when the last of them is that old."""
    with self._lock:
      left = self._stall_left(attempt_id)
      if left is None:
        return
      if left > 0:
        self._start_watch(left)
        return
    self._stalled(attempt_id)

  def abandon(self) -> None:
    """Neither the current attempt nor a retry waiting to start may touch the files any more (the cache is closed)."""
    with self._lock:
      target = self._abandon()
    _close(target)

  def _abandon(self) -> BinaryIO | None:
    """Under the lock: the current attempt may no longer touch the files, and a retry waiting to start will not. Returns
    its `.partial`, for the caller to close once out of the lock: the file then holds whole chunks of it for the next
    attempt to go on from (its writes take the lock), and no open handle is left by a thread that may stay blocked
    in a network read for long."""
    self._attempt_id += 1
    for timer in (self._retry, self._watch):
      if timer is not None:
        timer.cancel()
    self._retry = self._watch = None
    target, self._target = self._target, None
    return target

  def check_stall(self) -> None:
    """Fails the current attempt when it has received nothing for `stall_timeout` seconds."""
    with self._lock:
      attempt_id = self._attempt_id
      left = self._stall_left(attempt_id)
    if left is not None and left <= 0:
      self._stalled(attempt_id)

  def _stalled(self, attempt_id: int) -> None:
    self._failed(attempt_id, None, f"no data for {self.stall_timeout:g} s")

  def _failed(self, attempt_id: int, error: BaseException | None, cause: str) -> None:
    """Attempt `attempt_id` failed with `error` (None: it stalled), described by `cause`: it is abandoned, and the
    download retried after its wait or given up."""
    with self._lock:
      # A stall found (`check_stall`) just before the attempt ended, complete: nothing failed.
      if not self._current(attempt_id) or self.done.is_set():
        return
      target = self._abandon()
      self.error = error
      if (isinstance(error, CacheWriteError) or self.attempts >= self.retries
          or (error is not None and is_permanent(error))):
        self.cause = cause
        self.done.set()
      else:
        wait = retry_wait_s(self.attempts, self.retry_wait, error)
        logging.warning("download %d of %d of shard %s failed (%s); retrying in %.1f s", self.attempts, self.retries,
                        self.url, cause, wait)
        try:
          self._retry = self._timer(wait, self._start_retry)
        except RuntimeError as failure:  # no thread to be had: given up, or the reader would wait for it for ever
          self.cause = f"{cause}; its retry could not start ({describe(failure)})"
          self.done.set()
    _close(target)

  def _start_retry(self, attempt_id: int) -> None:
    """The timer's end: the next attempt starts, unless the download was abandoned meanwhile."""
    with self._lock:
      if self._current(attempt_id):
        self._start()

  def _current(self, attempt_id: int) -> bool:
    return attempt_id == self._attempt_id

  def _run(self, attempt_id: int) -> None:
    partial = self.path + PARTIAL_SUFFIX
    try:
      # No read-ahead cache ("none"): each read is one request for the bytes it asks, so the loop below sizes them.
      # (Given to `fs.open`: `fsspec.open` hands its keywords to the filesystem's constructor instead.)
      fs, path = fsspec.core.url_to_fs(self.url)
      checks_version = not hf_urls.at_commit(self.url)
      if checks_version:  # gcsfs answers `info` from the listing of the shards (process 0 listed them at launch)
        fs.invalidate_cache(path)
      with fs.open(path, "rb", cache_type="none") as source:
        # The version the file had as it was opened (fsspec's buffered files asked it then), or None unchecked.
        version = _file_version(getattr(source, "details", None) or fs.info(path)) if checks_version else None
        # The size the filesystem announced (fsspec's buffered files know it): a connection that ends early must
        # not leave a truncated shard renamed as complete.
        expected = getattr(source, "size", None)
        # Opening the source can take long; an attempt abandoned meanwhile must not then open the file that its
        # successor writes or that the cache has already cleaned up. Checked and opened under the lock that
        # `abandon` and `start` take.
        with self._lock:
          if not self._current(attempt_id):
            return
          with _cache_writes():
            target = self._target = open(partial, "ab")  # noqa: SIM115 — closed below, or by `abandon`
            offset = target.tell()
            # Bytes of another version of the file (replaced since they were written), or more than it has: the
            # download starts again from byte 0.
            if offset and (self._version not in (None, version) or (isinstance(expected, int) and offset > expected)):
              target.truncate(0)
              offset = target.seek(0)
          self._version = version
        if offset:
          source.seek(offset)
        written, block = offset, FIRST_BLOCK_BYTES
        try:
          while True:
            asked = time.monotonic()
            chunk = source.read(block if not isinstance(expected, int) else min(block, expected - written))
            if not chunk:
              break
            with self._lock:
              if not self._current(attempt_id):
                return
              with _cache_writes():
                target.write(chunk)
            written += len(chunk)
            self.progress_time = time.monotonic()
            block = next_block_bytes(len(chunk), self.progress_time - asked, self.stall_timeout)
          # The tail still buffered: a full disk found when it is written is the cache's error, not the download's
          # (at the file's close it was retried, then the shard skipped).
          with self._lock:
            if not self._current(attempt_id):
              return
            with _cache_writes():
              target.flush()
        finally:
          with _cache_writes():  # the close writes what is still buffered
            target.close()
        if isinstance(expected, int) and written != expected:
          raise OSError(f"the download ended after {written} of its {expected} bytes")
      if version is not None:
        now = _file_version(_info_now(fs, path))
        if now != version:  # replaced during this attempt: its bytes may be of two versions
          with self._lock:
            if self._current(attempt_id):
              with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
          raise OSError(f"the file was replaced while it was downloaded ({version[1]} {version[2]} of {version[0]} "
                        f"bytes, then {now[1]} {now[2]} of {now[0]} bytes); it is downloaded again from its start")
      with self._lock:
        if self._current(attempt_id):
          self._target = None
          with _cache_writes():  # the directory gone (deleted by hand?) is the cache's failure, not the shard's
            os.replace(partial, self.path)
          self.done.set()
    except Exception as error:  # Any other failure (network, permissions, missing file) is retried or given up.
      self._failed(attempt_id, error, describe(error))


def _close(target: BinaryIO | None) -> None:
  if target is not None:
    with contextlib.suppress(OSError, ValueError):
      target.close()


class ShardCache:
  """Fetches remote shards into `directory` ahead of use; `fetch` returns a local path to read. From its first remote
  shard until `close` it holds a lock on the directory, for `remove_unclaimed` in other processes to leave it alone.

  prefetch: how many upcoming shards are downloaded while the current one is read (the disk holds at most
    prefetch + 1 shards of this cache).
  stall_timeout: seconds without a byte received after which a download is retried.
  retries: attempts per shard before `fetch` gives up on it and returns None.
  retry_wait: seconds before the first retry; each further retry waits about twice as long (jittered).
  """

  def __init__(self, directory: str, *, prefetch: int = 2, stall_timeout: float = 120.0, retries: int = 3,
               retry_wait: float = 1.0):
    if prefetch < 0 or retries < 1 or stall_timeout <= 0 or retry_wait < 0:
      raise ValueError(f"need data.shard_prefetch >= 0, data.download_retries >= 1, data.stall_timeout > 0 and "
                       f"retry_wait >= 0; got {prefetch}, {retries}, {stall_timeout} and {retry_wait}")
    self.directory = os.path.expanduser(directory)
    self.prefetch = prefetch
    self.stall_timeout = stall_timeout
    self.retries = retries
    self.retry_wait = retry_wait
    # url -> why its last attempt failed, for shards given up on (named in the skip event and in epoch errors).
    self.failures: dict[str, str] = {}
    self._downloads: dict[str, _Download] = {}
    self._interrupted = threading.Event()
    self._swept = False
    self._claim: int | None = None  # the directory, opened and locked while this cache uses it (`_claim_directory`)

  def local_path(self, url: str) -> str:
    """Where `url` is cached: its file name behind a hash of the URL, so equal names in two folders differ."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    return os.path.join(self.directory, f"{digest}-{os.path.basename(url.rstrip('/'))}")

  def _ensure(self, url: str) -> _Download:
    download = self._downloads.get(url)
    if download is None:
      os.makedirs(self.directory, exist_ok=True)
      download = _Download(url, self.local_path(url), self.stall_timeout, self.retries, self.retry_wait)
      self._downloads[url] = download
      if os.path.exists(download.path):  # Fetched by an earlier run that crashed before reading it.
        os.utime(download.path)  # in use again: the disk watchdog deletes cached shards left untouched for a day
        download.done.set()
      else:
        download.start()
    return download

  def fetch(self, url: str, upcoming: Sequence[str] = ()) -> str | None:
    """A local path holding `url` (blocking until it is there), or None when every attempt failed (the cause is then
    in `failures[url]`). Raises CacheWriteError when the cache's directory cannot be written.

    `upcoming` are the shards to be read next, in order; the first `prefetch` of them start downloading now.
    """
    if is_local(url):
      return url
    remote_upcoming = [u for u in dict.fromkeys(upcoming) if u != url and not is_local(u)]
    if self._claim is None:
      self._claim_directory()
    if not self._swept:
      self._sweep(keep=[url, *remote_upcoming[: self.prefetch]])
    download = self._ensure(url)
    for next_url in remote_upcoming[: self.prefetch]:
      self._ensure(next_url)
    while True:
      self._check_interrupted(url)
      if download.done.wait(timeout=min(1.0, self.stall_timeout / 4)):
        break
      download.check_stall()
    if download.cause is None:
      return download.path
    if isinstance(download.error, CacheWriteError):
      self.close()
      raise CacheWriteError(f"{download.error} (in {self.directory}); free space there or "
                            "point data.cache_dir at a disk with room for data.shard_prefetch + 1 shards per "
                            "data stream") from download.error
    logging.warning("giving up on shard %s after %d attempts; last: %s", url, download.attempts, download.cause)
    self.failures[url] = download.cause
    self._downloads.pop(url, None)
    with contextlib.suppress(FileNotFoundError):
      os.remove(download.path + PARTIAL_SUFFIX)
    return None

  def _claim_directory(self) -> None:
    """Makes the directory and holds a shared lock on it until `close`, so that `remove_unclaimed` in another process
    (a later launch's) leaves it alone; the kernel drops the lock when the process ends, even at a SIGKILL. A removal
    under way (it holds the lock while it deletes) is waited for, and the directory made again."""
    missing: OSError | None = None
    for _ in range(CLAIM_TRIES):
      try:
        os.makedirs(self.directory, exist_ok=True)
        claim = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
      except FileNotFoundError as error:  # its parent removed meanwhile, once empty (`remove_unclaimed`'s caller)
        missing = error
        continue
      try:
        fcntl.flock(claim, fcntl.LOCK_SH)
      except OSError:  # a filesystem without locks, where `remove_unclaimed` cannot lock it either: used unlocked
        self._claim = claim
        return
      with contextlib.suppress(FileNotFoundError):
        if os.path.samestat(os.fstat(claim), os.stat(self.directory)):  # not removed before the lock was had
          self._claim = claim
          return
      os.close(claim)
    cause = describe(missing) if missing else f"it was removed each of {CLAIM_TRIES} times it was made"
    raise CacheWriteError(f"cannot make the shard cache {self.directory} ({cause}): check data.cache_dir (a link to "
                          "a disk that is not mounted?)")

  def _sweep(self, keep: Sequence[str]) -> None:
    """Deletes what an earlier launch that was killed (no `close`) left in the directory, except the copies of the
    shards in `keep`, about to be read: its shards fetched ahead, partial downloads and consumed markers. The
    directory must be this cache's alone (the trainer's: one per run, role, process and stream)."""
    self._swept = True
    wanted = {self.local_path(url) for url in keep}
    left = [entry.path for entry in os.scandir(self.directory) if entry.is_file() and entry.path not in wanted] \
        if os.path.isdir(self.directory) else []
    for path in left:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    if left:
      logging.info("deleted %d files an earlier launch left in %s", len(left), self.directory)

  def _check_interrupted(self, url: str) -> None:
    if self._interrupted.is_set():
      raise InterruptedError(f"the shard cache was interrupted while fetching {url}")

  def release(self, url: str) -> None:
    """`url` has been read: its cached copy is deleted (marked consumed first, for the disk watchdog)."""
    if is_local(url):
      return
    download = self._downloads.pop(url, None)
    path = download.path if download is not None else self.local_path(url)
    if not os.path.exists(path):
      return
    marker = path + CONSUMED_SUFFIX
    with open(marker, "w", encoding="utf-8"):
      pass
    os.remove(path)
    os.remove(marker)

  def interrupt(self) -> None:
    """Makes a `fetch` blocked in another thread raise InterruptedError, until `resume`."""
    self._interrupted.set()

  def resume(self) -> None:
    self._interrupted.clear()

  def close(self) -> None:
    """Abandons downloads in flight and deletes every shard fetched ahead but not read, so nothing is left; the
    directory is no longer claimed."""
    for download in self._downloads.values():
      download.abandon()
      for path in (download.path + PARTIAL_SUFFIX, download.path):
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
    self._downloads.clear()
    if self._claim is not None:
      os.close(self._claim)
      self._claim = None


def remove_unclaimed(directories: Iterable[str]) -> list[str]:
  """Deletes those of the cache `directories` (each a ShardCache's) that no cache of a live process holds, with what
  is in them, and returns them. For a launch to delete the caches that earlier launches left and it does not use
  (another process count or index, fewer data streams): their shards fetched ahead and partial downloads stayed on
  the disk for good. Each is deleted under an exclusive lock, which a cache's claim (`ShardCache._claim_directory`)
  waits for; one that cannot be locked (held; or a filesystem without locks) is left alone."""
  removed = []
  for directory in directories:
    try:
      handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
      continue
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      if os.path.samestat(os.fstat(handle), os.stat(directory)):  # not removed and made again since it was opened
        shutil.rmtree(directory)
        removed.append(directory)
    except (BlockingIOError, FileNotFoundError):  # held by a live cache, or removed meanwhile
      pass
    except OSError as error:  # a filesystem without locks, or a file that may not be deleted
      logging.warning("left the shard cache %s, which this launch does not use: %s", directory, describe(error))
    finally:
      os.close(handle)
  return removed
