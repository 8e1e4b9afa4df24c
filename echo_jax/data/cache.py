"""A local cache of remote shards, fetched ahead of the reader and deleted once read (DESIGN §6).

Every shard URL goes through fsspec, so local paths, `gs://`, `hf://datasets/org/name/...` (huggingface_hub
registers its HfFileSystem as `hf://` and reads the token from HF_TOKEN or the saved login itself; it never appears
on a command line or in a log) and any other filesystem take the same path. Local shards are read in place.

A remote shard is downloaded to `<name>.partial` and renamed to `<name>` when complete, so a half-written file
never looks finished. A download that makes no progress for `stall_timeout` seconds is abandoned and retried; after
`retries` failed attempts the shard is reported unreadable and the reader goes on without it. Once read, a shard is
marked `<name>.consumed` and deleted, so the disk watchdog can also clean up after a crash between the two steps.

fsspec's own caching filesystems ("filecache", "blockcache") keep what they fetched and neither prefetch nor
time out a stalled read, which is why this module exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Sequence

import fsspec

# Where remote shards wait to be read (config.data.cache_dir overrides it; '' reads them without a cache).
CHUNK_BYTES = 1 << 20
PARTIAL_SUFFIX = ".partial"
CONSUMED_SUFFIX = ".consumed"


def is_local(url: str) -> bool:
  """True for a path on this machine's filesystem, which is read in place."""
  return "file" in fsspec.core.url_to_fs(url)[0].protocol


class _Download:
  """One shard's download: attempts run in daemon threads, since a stalled network read cannot be interrupted."""

  def __init__(self, url: str, path: str):
    self.url = url
    self.path = path
    self.done = threading.Event()
    self.error: BaseException | None = None
    self.attempts = 0
    self.progress_time = time.monotonic()
    self._lock = threading.Lock()
    self._attempt_id = 0

  def start(self) -> None:
    """Starts a fresh attempt; any earlier attempt is abandoned and can no longer touch the files."""
    with self._lock:
      self._attempt_id += 1
      self.attempts += 1
      self.error = None
      self.progress_time = time.monotonic()
      with contextlib.suppress(FileNotFoundError):
        # An abandoned attempt keeps writing to its unlinked file, never to the new one.
        os.remove(self.path + PARTIAL_SUFFIX)
      attempt_id = self._attempt_id
    threading.Thread(target=self._run, args=(attempt_id,), name="echo-shard-download", daemon=True).start()

  def abandon(self) -> None:
    with self._lock:
      self._attempt_id += 1

  def _current(self, attempt_id: int) -> bool:
    return attempt_id == self._attempt_id

  def _run(self, attempt_id: int) -> None:
    partial = self.path + PARTIAL_SUFFIX
    try:
      with fsspec.open(self.url, "rb") as source:
        # Opening the source can take long; an attempt abandoned meanwhile must not then create (or truncate) the
        # file that its successor writes or that the cache has already cleaned up. Checked and opened under the
        # lock that `abandon` and `start` take.
        with self._lock:
          if not self._current(attempt_id):
            return
          target = open(partial, "wb")  # noqa: SIM115 — closed by the `with target` right below
        with target:
          while chunk := source.read(CHUNK_BYTES):
            if not self._current(attempt_id):
              return
            target.write(chunk)
            self.progress_time = time.monotonic()
      with self._lock:
        if self._current(attempt_id):
          os.replace(partial, self.path)
          self.done.set()
    except Exception as error:  # Any failure (network, permissions, missing file) is retried by the waiter.
      with self._lock:
        if self._current(attempt_id):
          self.error = error
          self.done.set()


class ShardCache:
  """Fetches remote shards into `directory` ahead of use; `fetch` returns a local path to read.

  prefetch: how many upcoming shards are downloaded while the current one is read (the disk holds at most
    prefetch + 1 shards of this cache).
  stall_timeout: seconds without a byte received after which a download is retried.
  retries: attempts per shard before `fetch` gives up on it and returns None.
  """

  def __init__(self, directory: str, *, prefetch: int = 2, stall_timeout: float = 120.0, retries: int = 3):
    if prefetch < 0 or retries < 1 or stall_timeout <= 0:
      raise ValueError(f"need prefetch >= 0, retries >= 1 and stall_timeout > 0; got prefetch={prefetch}, "
                       f"retries={retries}, stall_timeout={stall_timeout}")
    self.directory = os.path.expanduser(directory)
    self.prefetch = prefetch
    self.stall_timeout = stall_timeout
    self.retries = retries
    self._downloads: dict[str, _Download] = {}
    self._interrupted = threading.Event()

  def local_path(self, url: str) -> str:
    """Where `url` is cached: its file name behind a hash of the URL, so equal names in two folders differ."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    return os.path.join(self.directory, f"{digest}-{os.path.basename(url.rstrip('/'))}")

  def _ensure(self, url: str) -> _Download:
    download = self._downloads.get(url)
    if download is None:
      os.makedirs(self.directory, exist_ok=True)
      download = _Download(url, self.local_path(url))
      self._downloads[url] = download
      if os.path.exists(download.path):  # Fetched by an earlier run that crashed before reading it.
        download.done.set()
      else:
        download.start()
    return download

  def fetch(self, url: str, upcoming: Sequence[str] = ()) -> str | None:
    """A local path holding `url` (blocking until it is there), or None when every attempt failed.

    `upcoming` are the shards to be read next, in order; the first `prefetch` of them start downloading now.
    """
    if is_local(url):
      return url
    download = self._ensure(url)
    remote_upcoming = [u for u in dict.fromkeys(upcoming) if u != url and not is_local(u)]
    for next_url in remote_upcoming[: self.prefetch]:
      self._ensure(next_url)
    while True:
      if self._interrupted.is_set():
        raise InterruptedError(f"the shard cache was interrupted while fetching {url}")
      if download.done.wait(timeout=min(1.0, self.stall_timeout / 4)):
        if download.error is None:
          return download.path
      elif time.monotonic() - download.progress_time < self.stall_timeout:
        continue
      download.abandon()
      if download.attempts >= self.retries:
        self._downloads.pop(url, None)
        with contextlib.suppress(FileNotFoundError):
          os.remove(download.path + PARTIAL_SUFFIX)
        return None
      download.done.clear()
      download.start()

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
    """Abandons downloads in flight and deletes every shard fetched ahead but not read, so nothing is left."""
    for download in self._downloads.values():
      download.abandon()
      for path in (download.path + PARTIAL_SUFFIX, download.path):
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
    self._downloads.clear()
