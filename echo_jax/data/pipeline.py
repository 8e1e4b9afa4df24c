"""The streaming, exactly resumable training data pipeline (DESIGN §5, §6).

The data is split into G independent *streams*: stream g reads its slice of the shards, shuffled per epoch, and
yields fixed-shape numpy batches forever. A stream's position is three integers (epoch, shard in its epoch list,
sample in that shard's shuffled order) plus counters; every random choice is derived from (seed, epoch, stream,
shard position), so restoring a position re-reads one shard and continues with exactly the batches an
uninterrupted run would have produced.

`Pipeline` is one stream. `StreamSet` is what a process loads: stream g fills rows [g·B/G, (g+1)·B/G) of every
global batch of B rows, and a process reads the streams whose rows its devices hold. The global batch therefore
depends on the seed, the shards and G only, never on how many processes or devices share the work, and a
checkpointed position restores onto any layout whose process count divides G.
"""

from __future__ import annotations

import collections
import hashlib
import math
import posixpath
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from echo_jax.data.cache import ShardCache, is_local
from echo_jax.data.shards import MIN_REF_FRAMES, Sample, iter_shard, without_revision

STATE_VERSION = 1
STREAM_SET_VERSION = 1
BOS = 0
# Every float16 bit pattern's float32 value: np.take through this table converts about 2x faster than numpy's
# float16 cast, which has no vectorised loop, and is exact.
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
# Rng stream tags, so that shard order and sample order never share a random stream.
_SHARD_ORDER, _SAMPLE_ORDER = 0, 1
# How many shard names an error message lists before it only counts the rest.
_NAMED_SHARDS = 8
# A stream gives up when this many distinct shards in a row (or every shard) were read and held no usable sample, or
# when as many (or its share of an epoch, if more) gave none, counting shards it could not download. Not after one
# epoch of its own: with few shards per stream (4 shards over 4 streams), one bad or unreachable shard would fill a
# stream's whole epoch and stop a pod whose data is mostly good. Shards read and found useless are not given the
# epoch's share: on a large dataset (hundreds of shards per stream) data of the wrong kind (another latent size) was
# downloaded shard after shard until the hang watchdog ended the run without naming why; shards not downloaded
# (an outage of the store) are.
_BARREN_SHARDS = 16

Batch = dict[str, np.ndarray]
SkipEvent = tuple[str, str, str, str]  # (reason, sample key, shard, detail: why, where the reason alone does not say)


def _fingerprint(shards: Sequence[str]) -> str:
  # Without the commit that an hf:// listing pins (`list_shards`): a relaunch lists the dataset's newest commit, and
  # one that changed no shard (a README edit) must not send the run to another epoch. Shards added, removed or
  # renamed still change it.
  return hashlib.sha256("\n".join(without_revision(shard) for shard in shards).encode("utf-8")).hexdigest()[:16]


def _identity(shards: Sequence[str], seed: int, stream: int, streams: int) -> dict[str, Any]:
  """What a stream position belongs to: it continues only a stream with the same identity."""
  return {"shards_fingerprint": _fingerprint(shards), "num_shards": len(shards), "process_index": stream,
          "process_count": streams, "seed": seed}


def _state_mismatch(state: dict[str, Any], identity: dict[str, Any]) -> str:
  """Why the stream position `state` cannot continue the stream of `identity` (`_identity`), or "" when it can."""
  if any(state.get(name) != identity[name] for name in ("shards_fingerprint", "num_shards")):
    return (f"the shard list changed since the position was taken ({state.get('num_shards')} shards then, "
            f"{identity['num_shards']} now; shards_fingerprint {state.get('shards_fingerprint')!r} then, "
            f"{identity['shards_fingerprint']!r} now)")
  for name in ("seed", "process_index", "process_count"):
    if state.get(name) != identity[name]:
      return f"{name} changed since the position was taken ({state.get(name)!r} then, {identity[name]!r} now)"
  return ""


def stream_shards(shards: Sequence[str], seed: int, epoch: int, stream: int, streams: int) -> list[str]:
  """The shards stream `stream` of `streams` reads in `epoch`, in reading order: a global shuffle, cut to a multiple of
  `streams`, then a slice. Every stream reads as many shards an epoch, so streams of equal-sized shards stay in one
  epoch and none reads a shard that another still reads in the epoch before; the shards cut (other ones each epoch)
  wait for another epoch. (Uncut, 10 shards over 8 streams repeated 10 of their 80 samples within one pass.)"""
  order = np.random.default_rng([seed, _SHARD_ORDER, epoch]).permutation(len(shards))
  return [shards[i] for i in order[: len(order) - len(order) % streams][stream::streams]]


def _name_shards(shards: Sequence[str]) -> str:
  named = ", ".join(shards[:_NAMED_SHARDS])
  more = len(shards) - _NAMED_SHARDS
  return f"{named} (and {more} more)" if more > 0 else named


def _name_skips(events: Sequence[SkipEvent]) -> str:
  """The reasons of skip `events`, most frequent first, each with its count and first example."""
  counts = collections.Counter(reason for reason, *_ in events)
  first: dict[str, SkipEvent] = {}
  for event in events:
    first.setdefault(event[0], event)
  named = []
  for reason, count in counts.most_common():
    _, key, shard, detail = first[reason]
    example = f"{key} in {posixpath.basename(shard)}" if key else posixpath.basename(shard)
    named.append(f"{reason} × {count} (e.g. {example}" + (f": {detail})" if detail else ")"))
  return "; ".join(named)


class _Reader:
  """Builds batches in order from a position; single-threaded, so the Pipeline runs it in its producer thread."""

  def __init__(self, pipeline: Pipeline, state: dict[str, Any] | None):
    self._p = pipeline
    state = state or {}
    self.epoch = state.get("epoch", 0)
    self.shard_cursor = state.get("shard_cursor", 0)
    self.sample_cursor = state.get("sample_cursor", 0)
    self.samples = state.get("samples", 0)
    self.skipped: dict[str, int] = dict(state.get("skipped", {}))
    # The URL that the shard the position is inside was read from (hf:// at the commit then listed), kept in the
    # position (`state`).
    self._shard_url: str | None = state.get("shard")
    self._epoch_shards = self._shards_of_epoch(self.epoch)
    if self.shard_cursor >= len(self._epoch_shards):
      # A position inside a shard that the epoch's list no longer holds: taken before the lists were cut to a
      # multiple of the streams. That epoch goes on with the next one, as if the shard had been cut then.
      self.sample_cursor = 0
    self._order: list[Sample] | None = None
    self._crop_draws: np.ndarray | None = None
    self._events: list[SkipEvent] = []
    # The shards begun since the last usable sample; not in the position, so a restart counts afresh.
    self._barren: set[str] = set()

  def _shards_of_epoch(self, epoch: int) -> list[str]:
    p = self._p
    return stream_shards(p.shards, p.seed, epoch, p.process_index, p.process_count)

  def _upcoming(self) -> list[str]:
    """The shards after the current one, for the cache to fetch ahead."""
    p = self._p
    upcoming = self._epoch_shards[self.shard_cursor + 1 :]
    if p.cache is not None and len(upcoming) < p.cache.prefetch:
      upcoming = upcoming + self._shards_of_epoch(self.epoch + 1)
    return upcoming

  def _skip(self, reason: str, key: str, shard: str, detail: str = "") -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    self._events.append((reason, key, shard, detail))

  def take_events(self) -> list[SkipEvent]:
    """The skip events met since the last call."""
    events, self._events = self._events, []
    return events

  def _load_shard(self, report: bool) -> None:
    p = self._p
    shard = self._epoch_shards[self.shard_cursor]
    if not report and self._shard_url and without_revision(self._shard_url) == without_revision(shard):
      # The rest of a shard that the position is inside is read where its first part was: at the commit that
      # launch listed (a relaunch lists an hf:// dataset at its newest). A shard replaced since under its name held
      # other samples, in another order, and the position's count of them read from it twice and others never.
      shard = self._shard_url
    self._shard_url = shard
    # The shard before is let go first: it stayed in memory while this one was read, and streams of equal shards
    # cross into their next shards together, so every stream of a host held two decoded shards at once.
    self._order = self._crop_draws = None
    def on_skip(reason: str, key: str, path: str, detail: str = "") -> None:
      if report:  # Named by the shard's URL, not by where the cache put it.
        self._skip(reason, key, shard, detail)
      elif reason == "unreadable_shard":
        # Not one of the replayed skips: a position inside the shard was taken from a read of it. The samples after
        # the position cannot be counted without the shard, so the shard is named.
        lost = f"resumed after {self.sample_cursor} of its samples; the rest of it is skipped"
        self._skip(reason, key, shard, f"{detail}; {lost}" if detail else lost)

    if p.cache is None:
      samples = list(iter_shard(shard, on_skip, latent_dim=p.latent_dim))
    else:
      path = p.cache.fetch(shard, self._upcoming())
      if path is None:
        on_skip("unreadable_shard", "", shard, f"download failed: {p.cache.failures.get(shard, '')}")
        samples = []
      else:
        samples = list(iter_shard(path, on_skip, latent_dim=p.latent_dim))
        p.cache.release(shard)
    rng = np.random.default_rng([p.seed, _SAMPLE_ORDER, self.epoch, p.process_index, self.shard_cursor])
    self._order = [samples[i] for i in rng.permutation(len(samples))]
    self._crop_draws = rng.random(len(samples))

  def _next_sample(self) -> tuple[Sample, float]:
    """Returns the next valid sample and its crop draw in [0, 1), advancing shards and epochs as needed."""
    if self._order is None and self.sample_cursor > 0:
      # A restored position inside a shard: that shard's skips were reported before the position was taken (all
      # but a failure to read it again, which is new).
      self._load_shard(report=False)
    while self._order is None or self.sample_cursor >= len(self._order):
      if self._order is not None:
        self._next_shard()
      else:
        self._end_epoch_if_done()  # a restored position past its epoch's last shard
      self._check_not_barren()
      self._barren.add(self._epoch_shards[self.shard_cursor])
      self._load_shard(report=True)
    sample = self._order[self.sample_cursor]
    draw = float(self._crop_draws[self.sample_cursor])
    self.sample_cursor += 1
    return sample, draw

  def _next_shard(self) -> None:
    """Moves the position to the start of the next shard, not yet loaded."""
    self.shard_cursor += 1
    self.sample_cursor = 0
    self._order = self._crop_draws = None
    self._end_epoch_if_done()

  def _end_epoch_if_done(self) -> None:
    if self.shard_cursor >= len(self._epoch_shards):
      self.epoch += 1
      self.shard_cursor = 0
      self._epoch_shards = self._shards_of_epoch(self.epoch)

  def _check_not_barren(self) -> None:
    """Raises once the shards read since the last usable sample are all there are, or enough (`_BARREN_SHARDS`)."""
    p = self._p
    failures = p.cache.failures if p.cache is not None else {}
    read = sum(1 for url in self._barren if url not in failures)
    if (len(self._barren) < min(len(p.shards), max(_BARREN_SHARDS, len(p.shards) // p.process_count))
        and read < min(len(p.shards), _BARREN_SHARDS)):
      return
    barren = sorted(self._barren)
    causes = "; ".join(f"{url}: {failures[url]}" for url in barren[:_NAMED_SHARDS] if url in failures)
    # The skips are named here: a run this stops before its first logged step writes no skip events.
    skips = _name_skips(self._events) or "none recorded (skipped before this launch's position)"
    raise RuntimeError(
        f"stream {p.process_index} read {len(barren)} shards in a row without one usable sample (each sample "
        f"malformed or longer than data.max_frames={p.max_frames}, or the shard unreadable); the skips: {skips}; "
        f"the shards: {_name_shards(barren)}" + (f". Download failures: {causes}" if causes else ""))

  def state(self) -> dict[str, Any]:
    p = self._p
    return {
        "version": STATE_VERSION,
        **p.identity,
        "epoch": self.epoch,
        "shard_cursor": self.shard_cursor,
        "sample_cursor": self.sample_cursor,
        "shard": self._shard_url if self.sample_cursor else None,
        "samples": self.samples,
        "skipped": dict(sorted(self.skipped.items())),
    }

  def next_batch(self) -> tuple[Batch, dict[str, Any], list[SkipEvent]]:
    """Returns (batch, state right after it, skip events met while building it)."""
    p = self._p
    b, frames, ref_frames, dim, text_len = p.batch_size, p.max_frames, p.max_ref_frames, p.latent_dim, p.max_text_len
    latent = np.empty((b, frames, dim), np.float32)
    latent_mask = np.zeros((b, frames), bool)
    text = np.zeros((b, text_len), np.int32)
    text_mask = np.zeros((b, text_len), bool)
    speaker = np.zeros((b, ref_frames, dim), np.float32)
    speaker_mask = np.zeros((b, ref_frames), bool)
    row = 0
    while row < b:
      sample, draw = self._next_sample()
      length = sample.latent.shape[0]
      if length > frames:  # Cropping would cut words the text still names, so the sample is dropped.
        self._skip("too_long", sample.key, self._epoch_shards[self.shard_cursor])
        continue
      np.take(_F16_TO_F32, sample.latent.view(np.uint16).reshape(-1), out=latent[row, :length].reshape(-1))
      latent[row, length:] = p.pad_latent
      latent_mask[row, :length] = True

      ref_length = sample.ref.shape[0]
      crop = min(ref_length, ref_frames) // MIN_REF_FRAMES * MIN_REF_FRAMES
      start = int(draw * (ref_length - crop + 1))
      ref = sample.ref[start : start + crop]
      np.take(_F16_TO_F32, ref.view(np.uint16).reshape(-1), out=speaker[row, :crop].reshape(-1))
      speaker_mask[row, :crop] = True

      tokens = np.frombuffer(sample.text.encode("utf-8"), np.uint8)[: text_len - 1]
      text[row, 0] = BOS
      text[row, 1 : 1 + tokens.size] = tokens
      text_mask[row, : 1 + tokens.size] = True
      row += 1
      self._barren.clear()
      self.samples += 1
    if self._order is not None and self.sample_cursor >= len(self._order):
      # The batch used the shard up: the position after it is the next shard's start. Left at the shard's end, a
      # restart from it downloaded and decoded the whole shard again only to find nothing left in it (and, were it
      # unreadable then, reported its rest as skipped).
      self._next_shard()
    batch = {
        "latent": latent, "latent_mask": latent_mask, "text": text, "text_mask": text_mask,
        "speaker": speaker, "speaker_mask": speaker_mask,
    }
    return batch, self.state(), self.take_events()


class _Failure:
  """The reader's error, with the skip events met before it (delivered before the error is raised)."""

  def __init__(self, error: BaseException, events: list[SkipEvent]):
    self.error = error
    self.events = events


class Pipeline:
  """An endless iterator of fixed-shape numpy batches of one data stream, with an exactly restorable position.

  Batches hold `latent` [B, max_frames, D] float32 (padded with `pad_latent`), `latent_mask` [B, max_frames],
  `text` [B, max_text_len] int32 (BOS byte 0, then UTF-8 bytes, truncated, zero-padded), `text_mask`,
  `speaker` [B, max_ref_frames, D] float32 (a seeded random crop to a multiple of 4 frames, zero-padded) and
  `speaker_mask`; masks are bool. Malformed samples and targets longer than `max_frames` are skipped, counted in
  the state, and reported as `on_skip(reason, key, shard, detail)` from `__next__` (the caller's thread) when
  the batch that passed them is returned (or the error that ended the reader is raised). Memory: one decoded
  shard plus `prefetch` batches.

  process_index / process_count: this stream's index and the number of streams (the names predate streams).
  cache: fetches remote shards ahead into a local directory and deletes them once read (None: read every shard
  directly through fsspec).
  """

  def __init__(
      self,
      *,
      shards: Sequence[str],
      batch_size: int,
      latent_dim: int,
      max_text_len: int,
      max_frames: int,
      max_ref_frames: int,
      pad_latent: np.ndarray,
      seed: int,
      process_index: int = 0,
      process_count: int = 1,
      prefetch: int = 2,
      on_skip: Callable[[str, str, str, str], None] | None = None,
      state: dict[str, Any] | None = None,
      cache: ShardCache | None = None,
  ):
    self.shards = list(shards)
    self.batch_size = batch_size
    self.latent_dim = latent_dim
    self.max_text_len = max_text_len
    self.max_frames = max_frames
    self.max_ref_frames = max_ref_frames
    self.pad_latent = np.asarray(pad_latent, np.float32)
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.prefetch = prefetch
    self.on_skip = on_skip
    self.cache = cache
    self._check_arguments()
    # Computed once: every batch's state carries it (the fingerprint hashes the whole shard list).
    self.identity = _identity(self.shards, seed, process_index, process_count)
    self._state = self._check_state(state) if state is not None else _Reader(self, None).state()
    self._thread: threading.Thread | None = None
    self._closed = False
    # `close` may come from another thread than the one in `__next__` (a launch that fails while a thread reads its
    # held-out batches): it takes the first lock; the second is held while the caller's thread reads (prefetch 0).
    self._closing, self._reading = threading.Lock(), threading.Lock()
    self._start()

  def _check_arguments(self) -> None:
    if not self.shards:
      raise ValueError("the shard list is empty")
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} is outside [0, process_count={self.process_count})")
    check_shard_count(len(self.shards), self.process_count)
    for name in ("batch_size", "latent_dim", "max_frames", "max_ref_frames"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.max_ref_frames % MIN_REF_FRAMES:
      raise ValueError(f"max_ref_frames {self.max_ref_frames} is not a multiple of {MIN_REF_FRAMES}")
    if self.max_text_len < 2:
      raise ValueError(f"max_text_len {self.max_text_len} leaves no room for text after the BOS byte")
    if self.pad_latent.shape != (self.latent_dim,):
      raise ValueError(f"pad_latent has shape {self.pad_latent.shape}, expected ({self.latent_dim},)")
    if self.seed < 0:
      raise ValueError(f"seed must be non-negative, got {self.seed}")
    if self.prefetch < 0:
      raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")

  def _check_state(self, state: dict[str, Any]) -> dict[str, Any]:
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"data pipeline state has version {state.get('version')!r}, expected {STATE_VERSION}")
    why = _state_mismatch(state, self.identity)
    if why:
      raise ValueError(f"this data pipeline cannot continue from the state given: {why}; a position is only "
                       "meaningful for the same shard list, seed and process layout")
    return dict(state)

  def _start(self) -> None:
    self._reader = _Reader(self, self._state)
    self._stop = threading.Event()
    self._failure: _Failure | None = None
    if self.prefetch == 0:
      return
    self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
    self._thread = threading.Thread(target=self._produce, name="echo-data-pipeline", daemon=True)
    self._thread.start()

  def _put(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _get(self, thread: threading.Thread) -> Any:
    """The reader's next item; None once the pipeline is closed."""
    while True:
      try:
        return self._queue.get(timeout=1.0)
      except queue.Empty:
        if self._closed:
          return None
        if not thread.is_alive() and self._queue.empty():
          return _Failure(RuntimeError("the reader thread stopped without a batch or an error"), [])

  def _produce(self) -> None:
    try:
      while self._put(self._reader.next_batch()):
        pass
    except BaseException as error:  # Handed to the consumer, which re-raises it: a dead producer must not hang it.
      self._put(_Failure(error, self._reader.take_events()))

  def _stop_thread(self) -> None:
    if self._thread is not None:
      self._stop.set()
      if self.cache is not None:  # A reader waiting for a download must not hold up the join.
        self.cache.interrupt()
      self._thread.join()
      self._thread = None
      if self.cache is not None:
        self.cache.resume()

  def __iter__(self) -> Pipeline:
    return self

  def __next__(self) -> Batch:
    if self._closed:
      raise RuntimeError("the data pipeline is closed")
    if self._failure is not None:
      raise RuntimeError("the data pipeline failed earlier") from self._failure.error
    thread = self._thread  # once: a `close` in another thread sets it to None
    if thread is None:
      with self._reading:
        if self._closed:
          raise RuntimeError("the data pipeline is closed")
        try:
          item = self._reader.next_batch()
        except Exception as error:
          if self._closed:  # interrupted by the close
            raise RuntimeError("the data pipeline was closed while a batch was read") from error
          self._failure = _Failure(error, self._reader.take_events())
          self._report(self._failure.events)
          raise
    else:
      item = self._get(thread)
      if item is None:
        raise RuntimeError("the data pipeline was closed while a batch was awaited")
      if isinstance(item, _Failure):
        self._failure = item
        self._report(item.events)
        raise RuntimeError(f"the data pipeline's reader thread failed: {item.error}") from item.error
    batch, self._state, events = item
    self._report(events)
    return batch

  def _report(self, events: list[SkipEvent]) -> None:
    if self.on_skip is not None:
      for event in events:
        self.on_skip(*event)

  def state(self) -> dict[str, Any]:
    """The position right after the last batch returned by `__next__` (JSON-serialisable)."""
    return dict(self._state, skipped=dict(self._state.get("skipped", {})))  # none yet at a `fresh_position`

  def restore(self, state: dict[str, Any]) -> None:
    """Moves to `state`, so the next batch is the one that followed it when it was taken."""
    if self._closed:
      raise RuntimeError("the data pipeline is closed")
    self._state = self._check_state(state)
    self._stop_thread()
    self._start()

  def close(self) -> None:
    """Stops the reader thread; the pipeline yields nothing afterwards. From another thread, it also ends a
    `__next__` waiting there (within a second; it raises RuntimeError), also on a stalled download."""
    with self._closing:
      self._closed = True
      self._stop_thread()
      if self.cache is not None:
        self.cache.interrupt()  # a read in the caller's thread (prefetch 0) stops waiting for its download
        with self._reading:  # the cache is not cleaned up under that read
          self.cache.close()
          self.cache.resume()

  def __enter__(self) -> Pipeline:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def check_shards(shards: Sequence[str], streams: int, cache_dir: str | None) -> None:
  """Raises a ValueError saying what to set unless `shards` can feed `streams` streams through `cache_dir` (None: no
  shard cache). The trainer asks it right after listing the shards, before the compile (minutes on a pod)."""
  check_shard_count(len(shards), streams)
  remote = [shard for shard in shards if not is_local(shard)]
  if remote and not cache_dir:
    # Read straight from the network, a stalled shard would block its reader (and the step) with no timeout.
    raise ValueError(f"remote shards ({remote[0]}, ...) need a shard cache, which times out and retries stalled "
                     "downloads: set data.cache_dir to a local directory")


def check_shard_count(shards: int, streams: int) -> None:
  """Raises a ValueError saying what to set unless `shards` shards can give each of `streams` streams one."""
  if shards < streams:
    raise ValueError(f"{shards} shards cannot give each of data.streams={streams} streams a shard; "
                     "set data.streams to at most the number of shards")


def _streams_advice(batch_size: int, multiple: int) -> str:
  return f"set data.streams to a multiple of {multiple} that divides train.batch_size={batch_size}"


def check_stream_count(batch_size: int, streams: int, multiple: int = 1) -> None:
  """Raises a ValueError saying what to set unless `streams` is positive and divides `batch_size`; the advice asks
  for a multiple of `multiple`."""
  advice = _streams_advice(batch_size, multiple)
  if streams < 1:
    raise ValueError(f"data.streams must be positive, got {streams}; {advice}")
  if batch_size % streams:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by data.streams={streams}; {advice}")


def batch_streams(batch_size: int, streams: int, blocks: Sequence[tuple[int, int]]) -> list[int]:
  """The streams, ascending, that fill the global batch rows of `blocks` (a `runtime.process_batch_rows`); raises a
  ValueError saying what to set when a block is not a whole number of streams."""
  # The streams must cut the batch where each of this process's blocks begins and ends.
  bounds = [bound for block in blocks for bound in block]
  multiple = batch_size // math.gcd(batch_size, *bounds)
  check_stream_count(batch_size, streams, multiple)
  rows_per_stream = batch_size // streams
  if any(bound % rows_per_stream for bound in bounds):
    held = ", ".join(f"[{start}, {stop})" for start, stop in blocks)
    raise ValueError(f"this process holds global batch rows {held}, which are not a whole number of the {streams} "
                     f"data streams of {rows_per_stream} rows; {_streams_advice(batch_size, multiple)}")
  return [g for start, stop in blocks for g in range(start // rows_per_stream, stop // rows_per_stream)]


def position_mismatch(position: dict[str, Any], shards: Sequence[str], seed: int) -> str:
  """Why the StreamSet state `position` cannot continue over `shards` with `seed` (a sentence), or "" if it can."""
  identity = _identity(shards, seed, 0, len(position["streams"]))
  for stream, state in position["streams"].items():
    why = _state_mismatch(state, {**identity, "process_index": int(stream)})
    if why:
      return why
  return ""


def fresh_position(shards: Sequence[str], seed: int, num_streams: int, after: dict[str, Any] | None) -> dict[str, Any]:
  """A StreamSet state that starts each of `num_streams` streams over `shards` at the beginning of the epoch after
  the furthest one begun in `after` (a position that cannot continue: `position_mismatch`; None when there is none
  to read, e.g. from before streams existed: epoch 1): where such a run goes on, in an epoch it has not begun.
  Starting it at epoch 0 would replay, sample for sample, the order the run began with whenever the shards' count
  and the seed are unchanged (the dataset moved to another bucket, or data.streams changed)."""
  epoch = 1 + max((int(stream.get("epoch", 0)) for stream in after["streams"].values()), default=0) \
      if after is not None else 1
  return {"version": STREAM_SET_VERSION,
          "streams": {str(g): {"version": STATE_VERSION, **_identity(shards, seed, g, num_streams), "epoch": epoch}
                      for g in range(num_streams)}}


def read_position(state: dict[str, Any]) -> tuple[int, int, int]:
  """How far a stream's state has read: (epoch, shard in the epoch's list, sample in the shard's order)."""
  return state["epoch"], state["shard_cursor"], state["sample_cursor"]


def merge_stream_states(positions: Sequence[Any]) -> dict[str, Any] | None:
  """One StreamSet state holding every stream of `positions` (each process's state), of a stream that several
  processes read the furthest of their states (`StreamSet.align`); None when any is not a StreamSet state (a
  checkpoint from before streams existed)."""
  merged: dict[str, Any] = {}
  for position in positions:
    if not isinstance(position, dict) or position.get("version") != STREAM_SET_VERSION or "streams" not in position:
      return None
    for stream, state in position["streams"].items():
      if stream not in merged or read_position(state) > read_position(merged[stream]):
        merged[stream] = state
  return {"version": STREAM_SET_VERSION, "streams": merged}


class StreamSet:
  """This process's rows of every global batch: the batches of streams `streams` (ascending) of `num_streams`,
  stacked: the rows in the order `jax.make_array_from_process_local_data` takes them.

  Each stream is a `Pipeline` (its own reader thread) of batch_size // num_streams rows, reading its shards
  through its own cache subdirectory `cache_dir/stream_{g}` (None: no cache). `state` is a `merge_stream_states`
  result or a `state()` of an earlier StreamSet; it must hold every stream this one reads.
  """

  def __init__(self, *, shards: Sequence[str], batch_size: int, num_streams: int, streams: Sequence[int],
               state: dict[str, Any] | None = None, cache_dir: str | None = None, shard_prefetch: int = 2,
               stall_timeout: float = 120.0, retries: int = 3, **pipeline_args: Any):
    check_stream_count(batch_size, num_streams)
    if list(streams) != sorted(set(streams)) or not all(0 <= g < num_streams for g in streams):
      raise ValueError(f"streams {list(streams)} are not distinct ascending streams of data.streams={num_streams}")
    check_shards(shards, num_streams, cache_dir)
    positions = {}
    if state is not None:
      if state.get("version") != STREAM_SET_VERSION:
        raise ValueError(f"data position has version {state.get('version')!r}, expected {STREAM_SET_VERSION}")
      missing = [g for g in streams if str(g) not in state["streams"]]
      if missing:
        raise ValueError(f"data position holds streams {sorted(state['streams'], key=int)}, not {missing}: it was "
                         f"written with another data.streams (this run has {num_streams})")
      positions = state["streams"]
    self.streams = streams
    self._pipelines: list[Pipeline] = []
    try:
      for g in streams:
        cache = None
        if cache_dir:
          cache = ShardCache(f"{cache_dir}/stream_{g}", prefetch=shard_prefetch, stall_timeout=stall_timeout,
                             retries=retries)
        self._pipelines.append(Pipeline(
            shards=shards, batch_size=batch_size // num_streams, process_index=g, process_count=num_streams,
            state=positions.get(str(g)), cache=cache, **pipeline_args))
    except BaseException:
      self.close()
      raise

  def __iter__(self) -> StreamSet:
    return self

  def __next__(self) -> Batch:
    batches = [next(pipeline) for pipeline in self._pipelines]
    if len(batches) == 1:
      return batches[0]
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}

  def state(self) -> dict[str, Any]:
    """This process's streams' positions right after the last batch returned (JSON-serialisable)."""
    return {"version": STREAM_SET_VERSION,
            "streams": {str(g): p.state() for g, p in zip(self.streams, self._pipelines, strict=True)}}

  def align(self, position: dict[str, Any]) -> list[int]:
    """Moves each stream to its state in `position` (a `merge_stream_states` of every process's `state()`) where it
    read to elsewhere; returns the streams moved.

    Processes whose devices differ along the mesh's tensor axis only hold the same rows, and each reads their
    streams itself: a shard that one of them could not download (its retries used up) and another could puts them
    at different places in the stream, and from then on the same rows would hold different samples on each. Moved on
    to the furthest of their positions, none reads again a shard another gave up on, and the rows agree from the
    next batch."""
    moved = []
    for g, pipeline in zip(self.streams, self._pipelines, strict=True):
      target = position["streams"][str(g)]
      if read_position(pipeline.state()) != read_position(target):
        pipeline.restore(target)
        moved.append(g)
    return moved

  def close(self) -> None:
    for pipeline in self._pipelines:
      pipeline.close()

  def __enter__(self) -> StreamSet:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
