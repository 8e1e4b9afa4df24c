"""The shard cache (echo_jax.data.cache): one fsspec code path for local and remote shards, prefetch, deletion
after use, retries of stalled and failed downloads, and errors that say why."""

import contextlib
import errno
import functools
import io
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import fake_gcs
import fake_hub
import fsspec
import jax
import numpy as np
import pytest
from conftest import REPO, wait_for, write_synthetic_shards
from fsspec.spec import AbstractFileSystem

from echo_jax import aot, watchdog
from echo_jax.background import InBackground
from echo_jax.data import cache as cache_module
from echo_jax.data import shards as shards_module
from echo_jax.data.cache import CacheWriteError, ShardCache, is_local
from echo_jax.data.pipeline import Pipeline, StreamSet, stream_shards
from echo_jax.data.shards import list_shards
from echo_jax.train.loop import Trainer
from echo_jax.train.samples import examples_from_shards

RELEASE = threading.Event()  # Set at teardown, so that stalled reads of abandoned downloads end.


class StallingFileSystem(AbstractFileSystem):
  """`stalling://name`: serves bytes from `FILES`; the first `STALLS[name]` opens of a file hang on read; an open of
  a name in `OPEN_GATES` waits until its event is set; opening a name in `DENIED` raises PermissionError, and one in
  `UNAVAILABLE` ConnectionError; the first `CUT_SHORT[name]` opens end halfway through the file. Every open's time is
  in `OPENS[name]`."""

  protocol = "stalling"
  FILES: dict[str, bytes] = {}
  STALLS: dict[str, int] = {}
  OPEN_GATES: dict[str, threading.Event] = {}
  DENIED: set[str] = set()
  UNAVAILABLE: set[str] = set()
  CUT_SHORT: dict[str, int] = {}
  OPENS: dict[str, list[float]] = {}
  SERVED: dict[str, list[int]] = {}  # bytes read from each open of a file, in order
  # The first open of a name here serves half the file, then hangs until the event is set, then returns junk.
  HALF_THEN_HANG: dict[str, threading.Event] = {}

  def _open(self, path, mode="rb", **kwargs):
    name = self._strip_protocol(path)
    self.OPENS.setdefault(name, []).append(time.monotonic())
    if name in self.DENIED:
      raise PermissionError(f"401 Unauthorized for {name}: is the token expired?")
    if name in self.UNAVAILABLE:
      raise ConnectionError(f"503 Service Unavailable for {name}")
    if name in self.OPEN_GATES:
      self.OPEN_GATES[name].wait(30)
    if self.STALLS.get(name, 0) > 0:
      self.STALLS[name] -= 1
      return _StalledFile()
    if name in self.HALF_THEN_HANG and len(self.OPENS[name]) == 1:
      return _HalfThenHangingFile(self.FILES[name], self.HALF_THEN_HANG[name])
    if self.CUT_SHORT.get(name, 0) > 0:  # announces the whole size, then ends halfway
      self.CUT_SHORT[name] -= 1
      return _SizedFile(self.FILES[name][: len(self.FILES[name]) // 2], len(self.FILES[name]), self._served(name))
    return _SizedFile(self.FILES[name], len(self.FILES[name]), self._served(name))

  def _served(self, name):
    self.SERVED.setdefault(name, []).append(0)
    return functools.partial(self._count, name, len(self.SERVED[name]) - 1)

  def _count(self, name, index, size):
    self.SERVED[name][index] += size

  def info(self, path, **kwargs):
    name = self._strip_protocol(path)
    return {"name": name, "size": len(self.FILES[name]), "type": "file"}


class _SizedFile(io.BytesIO):
  """What fsspec's buffered files are in this respect: they know the size the filesystem announced. Each read's
  length goes to `served`."""

  def __init__(self, data, size, served):
    super().__init__(data)
    self.size = size
    self._served = served

  def read(self, size=-1):
    data = super().read(size)
    self._served(len(data))
    return data


class _HalfThenHangingFile(io.BytesIO):
  def __init__(self, data, release):
    super().__init__(data[: len(data) // 2])
    self.size, self._release = len(data), release

  def read(self, size=-1):
    data = super().read(size)
    if data:
      return data
    self._release.wait(30)
    return b"junk of an abandoned attempt"


class _StalledFile(io.RawIOBase):
  def readable(self):
    return True

  def read(self, size=-1):
    RELEASE.wait(30)
    return b""


@pytest.fixture(autouse=True)
def stalling_filesystem():
  fsspec.register_implementation("stalling", StallingFileSystem, clobber=True)
  RELEASE.clear()
  yield
  RELEASE.set()
  StallingFileSystem.FILES.clear()
  StallingFileSystem.STALLS.clear()
  StallingFileSystem.OPEN_GATES.clear()
  StallingFileSystem.DENIED.clear()
  StallingFileSystem.UNAVAILABLE.clear()
  StallingFileSystem.CUT_SHORT.clear()
  StallingFileSystem.OPENS.clear()
  StallingFileSystem.SERVED.clear()
  StallingFileSystem.HALF_THEN_HANG.clear()


def make_pipeline(shards, cache=None, **overrides):
  args = dict(shards=shards, batch_size=3, latent_dim=8, max_text_len=32, max_frames=32, max_ref_frames=16,
              pad_latent=np.zeros(8, np.float32), seed=0, prefetch=0, cache=cache)
  args.update(overrides)
  return Pipeline(**args)


def take(pipeline, n):
  return [next(pipeline) for _ in range(n)]


def assert_same(a, b):
  for batch_a, batch_b in zip(a, b, strict=True):
    for name in batch_a:
      np.testing.assert_array_equal(batch_a[name], batch_b[name], err_msg=name)


def copy_to(local_paths, prefix):
  """Copies shards to an fsspec location; returns their URLs in the same order."""
  urls = []
  for path in local_paths:
    url = f"{prefix}/{os.path.basename(path)}"
    with open(path, "rb") as source, fsspec.open(url, "wb") as target:
      target.write(source.read())
    urls.append(url)
  return urls


def cache_files(directory):
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_local_shards_are_read_in_place(tmp_path):
  shards = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=3, per_shard=4))
  cache = ShardCache(str(tmp_path / "cache"))
  assert cache.fetch(shards[0], upcoming=shards[1:]) == shards[0]
  cache.release(shards[0])
  assert os.path.exists(shards[0]) and not os.path.exists(tmp_path / "cache")
  with make_pipeline(shards) as direct, make_pipeline(shards, cache=cache) as cached:
    assert_same(take(direct, 6), take(cached, 6))
  assert not os.path.exists(tmp_path / "cache")


@pytest.fixture(params=["memory", "gs", "hf"])
def remote(request, tmp_path):
  """(where a test's remote shards go, a function that puts local shards there): fsspec's in-memory filesystem,
  gs:// through gcsfs to the GCS stand-in, or hf://datasets through huggingface_hub to the Hub stand-in."""
  if request.param == "memory":
    yield "memory://echo-test-shards", lambda paths: copy_to(paths, "memory://echo-test-shards")
  elif request.param == "gs":
    (tmp_path / "gcs" / "bucket").mkdir(parents=True)
    with fake_gcs.registered(str(tmp_path / "gcs")):
      yield "gs://bucket/shards", lambda paths: copy_to(paths, "gs://bucket/shards")
  else:
    repo = tmp_path / "hub" / "org" / "shards"
    repo.mkdir(parents=True)
    with fake_hub.registered(str(tmp_path / "hub")):
      yield "hf://datasets/org/shards", lambda paths: [shutil.copy(path, repo) for path in paths]


def test_remote_shards_stream_through_the_cache_and_consumed_shards_leave(tmp_path, remote):
  prefix, put = remote
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=4, per_shard=4))
  put(local)
  urls = list_shards(f"{prefix}/*.tar")
  assert [os.path.basename(url) for url in urls] == [os.path.basename(path) for path in local]
  directory = tmp_path / "cache"
  cache = ShardCache(str(directory), prefetch=1)
  with make_pipeline(local) as direct, make_pipeline(urls, cache=cache) as cached:
    # 20 batches of 3 go through the 16 samples almost four times: every shard is fetched and deleted again.
    for _ in range(20):
      assert_same([next(direct)], [next(cached)])
      files = cache_files(directory)
      assert len([f for f in files if f.endswith(".tar")]) <= 1, files  # the one shard fetched ahead
      assert not [f for f in files if f.endswith(".consumed")], files
  assert not cache_files(directory)  # closing deleted the shard fetched ahead and any download in flight
  # A consumed shard's cached copy is gone: fetch, release, and it is not there.
  path = cache.fetch(urls[0])
  assert pathlib.Path(path).read_bytes() == pathlib.Path(local[0]).read_bytes()
  cache.release(urls[0])
  assert not os.path.exists(path)


@contextlib.contextmanager
def remote_file(tmp_path, store, name, data):
  """(the stand-in's server, the URL of `data` stored as `name` there) while inside: on the GCS stand-in (gs://) or
  the Hub's (hf://, listed at its commit as list_shards does)."""
  if store == "gs":
    (tmp_path / "gcs" / "bucket").mkdir(parents=True)
    with fake_gcs.registered(str(tmp_path / "gcs")) as server:
      fsspec.filesystem("gs").pipe(f"gs://bucket/{name}", data)
      yield server, f"gs://bucket/{name}"
  else:
    (tmp_path / "hub" / "org" / "shards").mkdir(parents=True)
    (tmp_path / "hub" / "org" / "shards" / name).write_bytes(data)
    with fake_hub.registered(str(tmp_path / "hub")) as server:
      yield server, list_shards(f"hf://datasets/org/shards/{name}")[0]


@pytest.mark.parametrize("store", ["gs", "hf"])
def test_a_remote_shard_is_read_in_few_large_requests(tmp_path, store):
  """gcsfs and huggingface_hub read a file in 5 MB ranged requests unless told a block size: about 200 requests per
  GB of shards, per host and stream. The Hub limits those (its "resolvers") per account and 5-minute window across
  every host of a pod (5,000 for a free account: at 5 MB, some 80 MB/s for the whole pod, near what a large run
  reads), so a download asks for DOWNLOAD_BLOCK_BYTES at a time (found by review)."""
  data = np.random.default_rng(0).bytes(cache_module.DOWNLOAD_BLOCK_BYTES + (3 << 20))  # two blocks' worth
  with remote_file(tmp_path, store, "big.tar", data) as (server, url):
    path = ShardCache(str(tmp_path / "cache")).fetch(url)
    content = server.served if store == "gs" else [p for p, _ in server.requests if "/resolve/" in p]
  assert pathlib.Path(path).read_bytes() == data
  assert len(content) == 2, content  # 6 in blocks of 5 MB


class _SlowFile(fsspec.spec.AbstractBufferedFile):
  """A store's file whose every request takes its bytes at `_SlowStore.RATE`, answered whole (as gcsfs and
  huggingface_hub answer), and is recorded."""

  def _fetch_range(self, start, end):
    end = min(end, self.size)
    self.fs.requests.append((start, end))
    time.sleep((end - start) / _SlowStore.RATE)
    return _SlowStore.DATA[start:end]


class _SlowStore(fsspec.AbstractFileSystem):
  protocol = "slowstore"
  RATE = 4 << 20  # bytes/s: slow, never stalled
  DATA = np.random.default_rng(3).bytes(12 << 20)  # 3 s at RATE
  requests: list = []

  def __init__(self, block_size=None, **kwargs):  # as gcsfs and HfFileSystem take it: the files' default
    super().__init__(**kwargs)
    self.block_size = block_size or 5 << 20

  def info(self, path, **kwargs):
    return {"name": path, "size": len(self.DATA), "type": "file"}

  def _open(self, path, mode="rb", block_size=None, **kwargs):
    return _SlowFile(self, path, mode, block_size=block_size or self.block_size, size=len(self.DATA), **kwargs)


def test_a_slow_link_that_never_stalls_gets_its_shard(tmp_path, monkeypatch):
  """A request's answer arrives whole: asking for a 32 MiB block per request, a link slower than 32 MiB per
  stall_timeout showed no progress on any attempt, each retry asked for the same block again, and no shard arrived
  (found by review). Here 12 MiB at 4 MiB/s with a 2 s stall_timeout: the blocks follow the link's rate."""
  fsspec.register_implementation(_SlowStore.protocol, _SlowStore, clobber=True)
  monkeypatch.setattr(_SlowStore, "requests", [])
  cache = ShardCache(str(tmp_path / "cache"), prefetch=0, stall_timeout=2.0, retries=2, retry_wait=0.01)
  path = cache.fetch("slowstore://bucket/shard.tar")
  assert path is not None, (cache.failures, _SlowStore.requests)
  assert pathlib.Path(path).read_bytes() == _SlowStore.DATA
  starts = [start for start, _ in _SlowStore.requests]
  assert starts == sorted(set(starts)), _SlowStore.requests  # one attempt: no range asked twice
  assert all(end - start <= 4 << 20 for start, end in _SlowStore.requests), _SlowStore.requests
  cache.close()


def test_blocks_follow_the_link_rate_within_their_bounds():
  """A block is what the last one's rate brings in an eighth of stall_timeout, from 1 MiB to 32 MiB."""
  assert cache_module.next_block_bytes(4 << 20, 1.0, 120.0) == cache_module.DOWNLOAD_BLOCK_BYTES  # 60 MiB wanted
  assert cache_module.next_block_bytes(4 << 20, 1.0, 8.0) == 4 << 20
  assert cache_module.next_block_bytes(1 << 20, 60.0, 120.0) == cache_module.CHUNK_BYTES  # 256 KiB wanted
  assert cache_module.next_block_bytes(4 << 20, 0.0, 120.0) == cache_module.DOWNLOAD_BLOCK_BYTES


@pytest.mark.parametrize("store", ["gs", "hf"])
def test_a_retry_goes_on_from_the_bytes_already_there_through_gcsfs_and_huggingface_hub(tmp_path, store):
  """What a retry does after an attempt cut off partway, through the real clients: it seeks past the bytes in
  `.partial` and reads only the rest."""
  data = np.random.default_rng(1).bytes(3 << 20)
  with remote_file(tmp_path, store, "shard.tar", data) as (_, url):
    download = cache_module._Download(url, str(tmp_path / "shard.tar"), stall_timeout=120.0, retries=1, retry_wait=0)
    # Zeros in place of the first bytes, to show which bytes the retry read: the rest only.
    (tmp_path / "shard.tar.partial").write_bytes(bytes(1234567))
    download.start()
    assert download.done.wait(30) and download.error is None, download.error
  assert (tmp_path / "shard.tar").read_bytes() == bytes(1234567) + data[1234567:]
  assert not (tmp_path / "shard.tar.partial").exists()


@pytest.mark.parametrize("replaced", ["between_blocks", "between_attempts"])
def test_a_shard_replaced_while_it_downloads_is_downloaded_again_whole(tmp_path, monkeypatch, replaced):
  """Each request reads whatever version of the object is there then: a shard replaced on GCS between two blocks of
  a download, or between an attempt cut off and its retry (which goes on from the bytes already there), was the old
  shard's first block spliced to the new one's rest, of the same size and so taken for complete. The download notices
  the new generation and starts again from byte 0 (found by review)."""
  old, new = (np.random.default_rng(seed).bytes(cache_module.FIRST_BLOCK_BYTES + (1 << 20)) for seed in (5, 6))
  next_block_bytes = cache_module.next_block_bytes
  blocks = []

  def replace_after_the_first_block(received, seconds, stall_timeout):  # called between two blocks
    blocks.append(received)
    if len(blocks) == 1:
      fsspec.filesystem("gs").pipe(url, new)
      if replaced == "between_attempts":
        raise ConnectionError("connection reset by peer")
    return next_block_bytes(received, seconds, stall_timeout)

  monkeypatch.setattr(cache_module, "next_block_bytes", replace_after_the_first_block)
  with remote_file(tmp_path, "gs", "shard.tar", old) as (_, url):
    cache = ShardCache(str(tmp_path / "cache"), retries=3, retry_wait=0.01)
    path = cache.fetch(url)
  assert path is not None, cache.failures
  assert pathlib.Path(path).read_bytes() == new


def test_a_download_rate_limited_by_the_hub_waits_for_the_reset_it_names(tmp_path):
  """The Hub answers 429 with the seconds to its window's reset (RateLimit: ...;t=N): the retry waits that long,
  not the cache's own short waits, which (about two minutes over data.download_retries) would give up on shards a
  minute or more before the limit lifts (their samples skipped)."""
  (tmp_path / "hub" / "org" / "shards").mkdir(parents=True)
  (tmp_path / "hub" / "org" / "shards" / "a.tar").write_bytes(b"shard bytes")
  with fake_hub.registered(str(tmp_path / "hub")) as hub:
    url = list_shards("hf://datasets/org/shards/a.tar")[0]
    hub.rate_limited_until = time.monotonic() + 1.5
    start = time.monotonic()
    path = ShardCache(str(tmp_path / "cache"), retries=2, retry_wait=0.01).fetch(url)
    waited = time.monotonic() - start
  assert path is not None and pathlib.Path(path).read_bytes() == b"shard bytes"
  assert 1.5 <= waited < 10, waited
  assert cache_module.rate_limit_wait_s(ConnectionError("no status")) is None


def hub_dataset(tmp_path, num_shards, per_shard):
  """Synthetic shards as the files of the Hub stand-in's dataset org/shards (tmp_path/hub); returns their local
  copies, whose names the dataset's files have."""
  repo = tmp_path / "hub" / "org" / "shards"
  repo.mkdir(parents=True)
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=num_shards, per_shard=per_shard))
  for path in local:
    shutil.copy(path, repo)
  return local


HF_TOKEN = "hf_TestTokenThatMustNeverBeLogged"


def test_hf_reads_carry_the_token_and_a_refusal_is_reported_without_it(tmp_path, monkeypatch, caplog):
  """hf:// shards are read with the token of HF_TOKEN (or the saved login), which every request to the Hub carries;
  a shard the Hub refuses (401: an expired token) is given up on with that cause, and the token is in no message."""
  monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
  local = hub_dataset(tmp_path, num_shards=2, per_shard=4)
  with fake_hub.registered(str(tmp_path / "hub")) as hub, caplog.at_level(logging.DEBUG):
    hub.denied.add(f"org/shards/{os.path.basename(local[1])}")
    urls = list_shards("hf://datasets/org/shards/*.tar")
    cache = ShardCache(str(tmp_path / "cache"), retries=5, retry_wait=0.01)
    assert pathlib.Path(cache.fetch(urls[0])).read_bytes() == pathlib.Path(local[0]).read_bytes()
    assert cache.fetch(urls[1]) is None
  assert "401" in cache.failures[urls[1]] and os.path.basename(local[1]) in caplog.text
  # No retry gets past a refusal: given up at once, not after data.download_retries attempts and their waits.
  assert f"giving up on shard {urls[1]} after 1 attempts" in caplog.text
  assert hub.requests and {token for _, token in hub.requests} == {f"Bearer {HF_TOKEN}"}
  assert HF_TOKEN not in caplog.text and HF_TOKEN not in repr(cache.failures)


LOGIN_READ = """
import pathlib, sys
from echo_jax.data.cache import ShardCache
from echo_jax.data.shards import list_shards
urls = list_shards("hf://datasets/org/shards/*.tar")
fetched = pathlib.Path(ShardCache(sys.argv[1]).fetch(urls[0]))
print(len(urls), fetched.read_bytes() == pathlib.Path(sys.argv[2]).read_bytes())
"""


def test_hf_auth_login_on_a_worker_gives_its_runs_the_token(tmp_path):
  """The README's set-up for hf:// on a pod: `hf auth login` once on each worker, with the CLI that the requirements
  install (its `click` included, which typer no longer brings), then every run's reads carry the saved token."""
  token = "hf_TestLoginTokenOfAWorker"
  local = hub_dataset(tmp_path, num_shards=2, per_shard=2)
  home = tmp_path / "hf_home"
  home.mkdir()
  (home / ".check_for_update_done").touch()  # the CLI asks PyPI for a newer huggingface_hub at most once a day
  env = {name: value for name, value in os.environ.items() if name != "HF_TOKEN"}
  with fake_hub.serve(str(tmp_path / "hub")) as hub:
    env.update(HF_HOME=str(home), HF_ENDPOINT=hub.url)
    hf = os.path.join(os.path.dirname(sys.executable), "hf")
    login = subprocess.run([hf, "auth", "login", "--token", token], env=env, capture_output=True, text=True,
                           timeout=120)
    assert login.returncode == 0, login.stdout + login.stderr
    read = subprocess.run([sys.executable, "-c", LOGIN_READ, str(tmp_path / "cache"), local[0]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert read.returncode == 0 and read.stdout.split() == ["2", "True"], read.stdout + read.stderr[-3000:]
  reads = [authorization for path, authorization in hub.requests if path != "/api/whoami-v2"]
  assert reads and set(reads) == {f"Bearer {token}"}


def test_a_stalled_download_times_out_and_is_retried(tmp_path):
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=1, per_shard=4))
  StallingFileSystem.FILES["shard.tar"] = pathlib.Path(local[0]).read_bytes()
  StallingFileSystem.STALLS["shard.tar"] = 2
  cache = ShardCache(str(tmp_path / "cache"), stall_timeout=0.3, retries=3, retry_wait=0.05)
  path = cache.fetch("stalling://shard.tar")
  assert path is not None and pathlib.Path(path).read_bytes() == StallingFileSystem.FILES["shard.tar"]
  assert StallingFileSystem.STALLS["shard.tar"] == 0  # two stalled attempts, then the third one worked
  assert not [f for f in cache_files(tmp_path / "cache") if f.endswith(".partial")]


def test_an_attempt_abandoned_while_its_source_opens_writes_no_file(tmp_path):
  """Abandoned attempts (given up, or replaced by a retry) open no `.partial` afterwards: such a file was left
  behind, and could truncate the file of the attempt that replaced it."""
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=1, per_shard=4))
  StallingFileSystem.FILES["slow.tar"] = pathlib.Path(local[0]).read_bytes()
  gate = StallingFileSystem.OPEN_GATES["slow.tar"] = threading.Event()
  cache = ShardCache(str(tmp_path / "cache"), stall_timeout=0.2, retries=1)
  assert cache.fetch("stalling://slow.tar") is None  # its only attempt is still opening the source
  attempts = [t for t in threading.enumerate() if t.name == "echo-shard-download"]
  gate.set()
  for attempt in attempts:
    attempt.join(timeout=10)
  assert not cache_files(tmp_path / "cache")


def test_a_shard_that_always_stalls_is_skipped_and_the_stream_goes_on(tmp_path):
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=2, per_shard=4))
  urls = []
  for index, path in enumerate(local):
    name = f"shard{index}.tar"
    StallingFileSystem.FILES[name] = pathlib.Path(path).read_bytes()
    urls.append(f"stalling://{name}")
  StallingFileSystem.STALLS["shard0.tar"] = 1000
  skips = []
  cache = ShardCache(str(tmp_path / "cache"), stall_timeout=0.2, retries=2, retry_wait=0)
  with make_pipeline(urls, cache=cache, on_skip=lambda *event: skips.append(event)) as pipeline:
    batches = take(pipeline, 4)  # 12 rows, all from the good shard (4 samples, repeated over epochs)
  assert ("unreadable_shard", "", "stalling://shard0.tar", "download failed: no data for 0.2 s") in skips
  assert all(batch["text_mask"].any(axis=1).all() for batch in batches)
  assert not [f for f in cache_files(tmp_path / "cache") if f.endswith(".partial")]


def open_partials():
  """The files this process holds open under a `.partial` name (deleted or not)."""
  links = []
  for fd in os.listdir("/proc/self/fd"):
    with contextlib.suppress(FileNotFoundError):  # the descriptor of the listing itself, closed by now
      links.append(os.readlink(f"/proc/self/fd/{fd}"))
  return [link for link in links if ".partial" in link]


def test_an_abandoned_attempt_releases_its_partial_file(tmp_path):
  """A stalled attempt's thread stays blocked in its read; its unlinked `.partial` must not stay open (the disk space
  of a deleted but open file is freed only when it is closed, and neither `du` nor the watchdog sees it)."""
  StallingFileSystem.FILES["stuck.tar"] = b"x" * 100
  StallingFileSystem.STALLS["stuck.tar"] = 1000
  cache = ShardCache(str(tmp_path / "cache"), stall_timeout=0.2, retries=3, retry_wait=0)
  assert cache.fetch("stalling://stuck.tar") is None
  assert len(StallingFileSystem.OPENS["stuck.tar"]) == 3
  assert [t for t in threading.enumerate() if t.name == "echo-shard-download"]  # still blocked in their reads
  assert open_partials() == []
  assert cache.failures == {"stalling://stuck.tar": "no data for 0.2 s"}


def stalled_for_good(name):
  """A `stalling://` URL whose every download stalls (until the test ends)."""
  StallingFileSystem.FILES[name] = b"x" * 100
  StallingFileSystem.STALLS[name] = 1000
  return f"stalling://{name}"


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_close_from_another_thread_ends_a_read_waiting_on_a_stalled_download(tmp_path, prefetch):
  """`close` in one thread ends a `next` waiting in another on a stalled download at once, not after the stall
  timeout and retries (90 s here), with an error saying so; the cache is cleaned up. The trainer closes its held-out
  read so when a launch fails, since Python's exit would wait for that thread."""
  cache = ShardCache(str(tmp_path / "cache"), stall_timeout=30, retries=3)
  pipeline = make_pipeline([stalled_for_good("stuck.tar")], cache=cache, prefetch=prefetch)
  raised = []

  def read():
    try:
      next(pipeline)
    except Exception as error:  # noqa: BLE001 — kept for the assertions below
      raised.append(error)

  reader = threading.Thread(target=read)
  reader.start()
  wait_for(lambda: StallingFileSystem.OPENS.get("stuck.tar"))
  time.sleep(0.3)
  assert reader.is_alive()  # waiting on the download
  pipeline.close()
  reader.join(timeout=10)
  assert not reader.is_alive()
  assert len(raised) == 1 and isinstance(raised[0], RuntimeError) and "closed" in str(raised[0]), raised
  assert not cache_files(tmp_path / "cache")
  with pytest.raises(RuntimeError, match="closed"):
    next(pipeline)


def test_a_launch_that_fails_stops_its_held_out_read(tiny_config, tmp_path, monkeypatch):
  """A new run reads its held-out batches while it compiles. When the launch fails (here its memory check refuses
  the step), that read ends with it: Python's exit waits for the thread, which would otherwise wait out the held-out
  shard's stall timeout and retries (90 s here; up to minutes on a pod)."""
  tiny_config.data.eval_shards = stalled_for_good("held_out.tar")
  tiny_config.data.update(cache_dir=str(tmp_path / "cache"), stall_timeout=30.0, download_retries=3)

  def refuse(*args, **kwargs):
    raise RuntimeError("the train step needs more memory than the devices have")

  monkeypatch.setattr(aot, "check_memory", refuse)
  with pytest.raises(RuntimeError, match="more memory"):
    Trainer(tiny_config, str(tmp_path / "run")).run()
  assert StallingFileSystem.OPENS.get("held_out.tar")  # its read was under way
  wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("held_out")], timeout=10)
  assert not [name for _, _, names in os.walk(tmp_path / "cache") for name in names]


def test_a_run_that_ends_before_its_first_evaluation_stops_its_held_out_read(tiny_config, tmp_path):
  """A restart reads its held-out batches once its first step is logged (its first evaluation is eval_every steps
  away); a run that ends before that evaluation ends the read too, so that its exit does not wait for it."""
  tiny_config.train.update(steps=2, ckpt_every=2, eval_every=100, log_every=1)
  Trainer(tiny_config, str(tmp_path / "run")).run()  # evaluates at step 0, on the local held-out shard
  tiny_config.data.eval_shards = stalled_for_good("held_out.tar")
  tiny_config.data.update(cache_dir=str(tmp_path / "cache"), stall_timeout=30.0, download_retries=3)
  tiny_config.train.steps = 4
  Trainer(tiny_config, str(tmp_path / "run")).run()
  assert StallingFileSystem.OPENS.get("held_out.tar")  # its read was under way
  wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("held_out")], timeout=10)


def test_processes_on_one_host_read_the_held_out_set_through_caches_of_their_own(tiny_config, tmp_path,
                                                                              monkeypatch):
  """Every process reads the whole held-out set (one stream); two processes on one host (`launch.sh --local 2`)
  sharing its cache directory adopted each other's fetched-ahead shards and deleted them once read, so that each
  skipped shards and their global eval batch mixed rows of different batches."""
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=4, per_shard=3, seed=1, prefix="eval"))
  for path in local:
    StallingFileSystem.FILES[os.path.basename(path)] = pathlib.Path(path).read_bytes()
  urls = [f"stalling://{os.path.basename(path)}" for path in local]
  tiny_config.data.cache_dir = str(tmp_path / "cache")
  trainer = Trainer(tiny_config, str(tmp_path / "run"))
  readers = []
  for process in range(2):
    monkeypatch.setattr(jax, "process_index", lambda process=process: process)
    readers.append(trainer._pipeline("eval", urls, 0, whole_batch=True))
  with readers[0], readers[1]:
    for _ in range(4):  # a whole pass, in turn, as the processes' threads may read
      assert_same([next(readers[0])], [next(readers[1])])
  assert not trainer._skips
  # Processes that differ only along the tensor axis read the same training streams: caches of their own too. They
  # run at once: the second starts while the first holds its cache (a launch deletes those of its run not held).
  with contextlib.ExitStack() as running:
    for process in range(2):
      monkeypatch.setattr(jax, "process_index", lambda process=process: process)
      next(running.enter_context(trainer._pipeline("train", urls, 0)))
  # The disk watchdog knows these directories for what they are (it deletes shards left in them for a day).
  streams = sorted(os.path.relpath(d, tmp_path / "cache") for d, _, _ in os.walk(tmp_path / "cache") if "stream_" in d)
  assert len(streams) == 4 and all(watchdog._SHARD_CACHE_STREAM.search(d) for d in streams), streams
  assert [d.split("-")[0] + d.split("-")[-1] for d in streams] == [
      "evalprocess_0/stream_0", "evalprocess_1/stream_0", "trainprocess_0/stream_0", "trainprocess_1/stream_0"]


def test_a_launch_deletes_the_caches_of_its_run_that_it_does_not_use_and_none_in_use(tiny_config, tmp_path):
  """The cache is a directory per run, role, process and stream: a relaunch with fewer processes (or with another
  host order) or fewer data.streams left the other directories' shards fetched ahead and partial downloads on the
  disk for good (found by review). A launch deletes those of its run and role that no live process holds; one that a
  cache of a live process holds (a process of this launch on this host) stays, as do other runs' and roles'."""
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=2, per_shard=4))
  for path in local:
    StallingFileSystem.FILES[os.path.basename(path)] = pathlib.Path(path).read_bytes()
  urls = [f"stalling://{os.path.basename(path)}" for path in local]
  tiny_config.data.cache_dir = str(tmp_path / "cache")
  trainer = Trainer(tiny_config, str(tmp_path / "run"))
  own = trainer._cache_dir("train")  # .../train-RUN-process_0
  other_process = own.removesuffix("0") + "1"
  left = [f"{own}/stream_9", f"{other_process}/stream_0", f"{other_process}/stream_1"]
  another_run = tmp_path / "cache" / "train-0123456789ab-process_1" / "stream_0"
  kept = [f"{trainer._cache_dir('eval')}/stream_0", str(another_run)]
  for directory in left + kept:
    os.makedirs(directory)
    for name in ("train-00007.tar", "train-00008.tar.partial"):
      (pathlib.Path(directory) / name).write_bytes(b"left by an earlier launch")
  held = ShardCache(own.removesuffix("0") + "2/stream_0")  # a live process's cache
  held.fetch(urls[0])
  with trainer._pipeline("train", urls, 0) as training:
    next(training)
  assert not [directory for directory in left if os.path.exists(directory)]
  assert not os.path.exists(other_process)
  assert all(len(cache_files(directory)) == 2 for directory in kept)
  assert cache_files(held.directory) == [os.path.basename(held.local_path(urls[0]))]
  held.close()


def test_a_cache_dir_spelled_with_a_trailing_slash_keeps_the_caches_in_use(tiny_config, tmp_path):
  """The caches in use were told from those found by their paths as strings: with data.cache_dir="…/cache//" the
  process's own were spelled otherwise and deleted as unused (found by review)."""
  tiny_config.data.cache_dir = f"{tmp_path}/cache//"
  trainer = Trainer(tiny_config, str(tmp_path / "run"))
  own = pathlib.Path(trainer._cache_dir("train"), "stream_0")
  own.mkdir(parents=True)
  (own / "train-00007.tar").write_bytes(b"fetched ahead by an earlier launch")
  trainer._remove_unused_caches("train", [0])
  assert cache_files(own) == ["train-00007.tar"]


HOLD_A_CACHE = """
import sys
import fsspec
from echo_jax.data.cache import ShardCache
fsspec.filesystem("memory").pipe("memory://shards/a.tar", b"shard bytes")
ShardCache(sys.argv[1]).fetch("memory://shards/a.tar")
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_cache_that_a_live_process_holds_is_not_removed_and_a_killed_one_is(tmp_path):
  """`remove_unclaimed` tells a cache in use by another process from one whose process died (SIGKILL included):
  the kernel drops a cache's lock on its directory when its process ends."""
  directory = str(tmp_path / "cache" / "stream_0")
  with subprocess.Popen([sys.executable, "-c", HOLD_A_CACHE, directory], cwd=REPO, stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True) as holder:
    try:
      assert holder.stdout.readline() == "holding\n"
      assert cache_module.remove_unclaimed([directory]) == [] and len(cache_files(directory)) == 1
    finally:
      holder.kill()  # as a launch killed by SIGKILL
  assert cache_module.remove_unclaimed([directory, str(tmp_path / "missing")]) == [directory]
  assert not os.path.exists(directory)


def test_what_a_killed_launch_fetched_ahead_is_deleted_by_the_next_one(tmp_path):
  """A launch killed (out of memory, or SIGKILL after a preemption's grace) never closes its cache: the shards it
  fetched ahead stayed on the disk for good unless a relaunch happened to read those very shards. The next launch's
  cache deletes them at its first fetch, and adopts the copies of the shards it is about to read."""
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=5, per_shard=2))
  urls = []
  for path in local:
    StallingFileSystem.FILES[os.path.basename(path)] = pathlib.Path(path).read_bytes()
    urls.append(f"stalling://{os.path.basename(path)}")
  killed = ShardCache(str(tmp_path / "cache"), prefetch=3)
  killed.fetch(urls[0], upcoming=urls[1:4])
  for url in urls[1:4]:
    killed.fetch(url)  # complete: shards 0-3 are on the disk, none read
  pathlib.Path(killed.local_path(urls[0]) + ".consumed").touch()  # killed between the marker and the deletion
  opens = {url: len(StallingFileSystem.OPENS[url.removeprefix("stalling://")]) for url in urls[:4]}

  two_days_ago = time.time() - 2 * 86400
  os.utime(killed.local_path(urls[3]), (two_days_ago, two_days_ago))
  relaunch = ShardCache(str(tmp_path / "cache"), prefetch=1)
  path = relaunch.fetch(urls[3], upcoming=[urls[4]])
  # Adopted means in use: the disk watchdog's rule for shards left a day (stale_shard) must not take it now.
  assert time.time() - os.path.getmtime(path) < 3600
  relaunch.fetch(urls[4])
  assert cache_files(tmp_path / "cache") == sorted(os.path.basename(relaunch.local_path(u)) for u in urls[3:])
  assert len(StallingFileSystem.OPENS["train-00003.tar"]) == opens[urls[3]]  # adopted, not fetched again
  assert path == relaunch.local_path(urls[3])
  relaunch.close()
  assert cache_files(tmp_path / "cache") == []


def test_a_pattern_under_a_missing_hub_directory_is_named_in_the_error(tmp_path):
  """huggingface_hub's filesystem raises its own FileNotFoundError, naming only a path, for such a pattern."""
  (tmp_path / "hub" / "org" / "shards").mkdir(parents=True)
  with fake_hub.registered(str(tmp_path / "hub")), pytest.raises(
      FileNotFoundError, match=r"shard spec item 'hf://datasets/org/shards/nodir/\*\.tar' .*matches no file \("):
    list_shards("hf://datasets/org/shards/nodir/*.tar")


def test_a_hub_outage_while_listing_is_retried_and_a_long_one_names_the_attempts(tmp_path, monkeypatch):
  """huggingface_hub does not retry its listing's first request: a 503 from the Hub failed the launch."""
  monkeypatch.setattr(shards_module, "LIST_RETRY_WAIT_S", 0.0)
  local = hub_dataset(tmp_path, num_shards=2, per_shard=2)
  with fake_hub.registered(str(tmp_path / "hub")) as hub:
    hub.unavailable = 100
    with pytest.raises(OSError, match=r"could not list .*: 4 attempts failed, the last with .*503"):
      list_shards("hf://datasets/org/shards/*.tar")
    hub.unavailable = 2
    listed = list_shards("hf://datasets/org/shards/*.tar")
  assert [os.path.basename(url) for url in listed] == [os.path.basename(path) for path in local]


def test_an_hf_listing_reads_the_commit_it_was_listed_at_whatever_is_committed_after(tmp_path):
  """hf:// URLs named no revision: every download read main as it was then, minutes to days after the listing, so
  a commit during a run changed what the run read (a deleted shard became a 404 and was skipped, one uploaded again
  was read new). A listing names main's commit in its URLs, which read that commit's files after later commits; a
  relisting names the newer commit."""
  root = str(tmp_path / "hub")
  local = hub_dataset(tmp_path, num_shards=3, per_shard=2)
  names = [os.path.basename(path) for path in local]
  with fake_hub.registered(root):
    urls = list_shards("hf://datasets/org/shards/*.tar")
    newer = fake_hub.commit(root, "org/shards", {names[0]: None, names[1]: b"uploaded again", "train-9.tar": b"new"})
    cache = ShardCache(str(tmp_path / "cache"), retries=1)
    fetched = [cache.fetch(url) for url in urls]
    assert [path and pathlib.Path(path).read_bytes() for path in fetched] == [
        pathlib.Path(path).read_bytes() for path in local]
    relisted = list_shards("hf://datasets/org/shards/*.tar")
    assert pathlib.Path(cache.fetch(relisted[0])).read_bytes() == b"uploaded again"
  assert urls == [f"hf://datasets/org/shards@{fake_hub.REVISION}/{name}" for name in names]
  assert relisted == [f"hf://datasets/org/shards@{newer}/{name}" for name in [*names[1:], "train-9.tar"]]


def test_an_hf_item_naming_a_revision_is_listed_at_its_commit_and_one_the_hub_lacks_is_named(tmp_path):
  """A tag, a branch (main) or a commit after the repository's "@" is listed at the commit it names then; items
  naming one repository and revision are resolved once, so that a commit between two of them cannot list a shard
  twice. A revision or repository that does not exist fails the listing with what to check."""
  root = str(tmp_path / "hub")
  local = hub_dataset(tmp_path, num_shards=2, per_shard=2)
  names = [os.path.basename(path) for path in local]
  first = fake_hub.head(root, "org/shards")
  fake_hub.tag(root, "org/shards", "v1")
  second = fake_hub.commit(root, "org/shards", {names[0]: None})
  at_first = [f"hf://datasets/org/shards@{first}/{name}" for name in names]
  with fake_hub.registered(root):
    assert list_shards(f"hf://datasets/org/shards@v1/*.tar,hf://datasets/org/shards@v1/{names[1]}") == at_first
    assert list_shards(f"hf://datasets/org/shards@{first}/*.tar") == at_first
    assert list_shards("hf://datasets/org/shards@main/*.tar") == [f"hf://datasets/org/shards@{second}/{names[1]}"]
    with pytest.raises(FileNotFoundError, match=r"shard spec item 'hf://datasets/org/shards@v2/\*\.tar' .*names "
                       r"revision 'v2' of hf://datasets/org/shards, which the Hub does not have \(.*; name one of"):
      list_shards("hf://datasets/org/shards@v2/*.tar")
    with pytest.raises(FileNotFoundError, match=r"names a repository that the Hub does not have or that this login "
                       r"may not read \(.*RepositoryNotFoundError.*; check the name"):
      list_shards("hf://datasets/org/missing/*.tar")


def test_a_hub_outage_while_resolving_the_commit_of_a_listing_is_retried(tmp_path, monkeypatch):
  """The commit that main names is asked for at each listing, by the request that 503s here (huggingface_hub asks
  nothing else again of a repository it has seen in this process, and keeps the files of a commit it listed)."""
  monkeypatch.setattr(shards_module, "LIST_RETRY_WAIT_S", 0.0)
  hub_dataset(tmp_path, num_shards=2, per_shard=2)
  with fake_hub.registered(str(tmp_path / "hub")) as hub:
    listed = list_shards("hf://datasets/org/shards/*.tar")
    hub.unavailable, before = 3, len(hub.requests)
    assert list_shards("hf://datasets/org/shards/*.tar") == listed
  assert [path for path, _ in hub.requests[before:]] == ["/api/datasets/org/shards/revision/main"] * 4


def test_a_relisting_at_a_newer_hub_commit_keeps_the_data_position_and_an_added_shard_resets_it(tmp_path):
  """A relaunch lists main again and its URLs name main's newest commit. One that changed no shard (a README edit)
  must not reset the data position, which would send every restart after it to another epoch; a shard added still
  does."""
  root = str(tmp_path / "hub")
  local = hub_dataset(tmp_path, num_shards=3, per_shard=4)
  cache = ShardCache(str(tmp_path / "cache"))
  with fake_hub.registered(root):
    urls = list_shards("hf://datasets/org/shards/*.tar")
    with make_pipeline(urls, cache=cache) as pipeline:
      take(pipeline, 2)
      state = pipeline.state()
      after = take(pipeline, 3)
    readme = fake_hub.commit(root, "org/shards", {"README.md": b"# Echo shards\n"})
    relisted = list_shards("hf://datasets/org/shards/*.tar")
    assert all(f"@{readme}/" in url for url in relisted)
    with make_pipeline(relisted, cache=cache, state=state) as resumed:
      assert_same(take(resumed, 3), after)
    fake_hub.commit(root, "org/shards", {"train-00003.tar": pathlib.Path(local[0]).read_bytes()})
    grown = list_shards("hf://datasets/org/shards/*.tar")
  with pytest.raises(ValueError, match=r"the shard list changed since the position was taken \(3 shards then, 4 now"):
    make_pipeline(grown, state=state)


def test_a_shard_replaced_on_the_hub_after_a_position_inside_it_is_read_on_at_the_commit_it_was_begun_at(tmp_path):
  """A relaunch lists the dataset at its newest commit and goes on from its data position. A shard replaced under its
  name since (a fix pushed during the run) held other samples in another order, and the position's count of them
  was taken in that: samples of it were read twice and others never, silently (found by review). The rest of the
  shard that a position is inside is read at the commit its first part was, as the uninterrupted run read it."""
  root = str(tmp_path / "hub")
  hub_dataset(tmp_path, num_shards=2, per_shard=6)
  replacement = list_shards(write_synthetic_shards(tmp_path / "fixed", num_shards=2, per_shard=6, seed=7))
  cache = ShardCache(str(tmp_path / "cache"))
  with fake_hub.registered(root):
    urls = list_shards("hf://datasets/org/shards/*.tar")
    with make_pipeline(urls, cache=cache) as pipeline:
      take(pipeline, 1)  # 3 of the first shard's 6 samples
      state = json.loads(json.dumps(pipeline.state()))
      after = take(pipeline, 3)  # its other 3, then the next shard's 6
    inside = stream_shards(urls, 0, 0, 0, 1)[0]
    assert (state["shard_cursor"], state["sample_cursor"]) == (0, 3)
    name = os.path.basename(inside)
    fake_hub.commit(root, "org/shards", {name: pathlib.Path(replacement[0]).read_bytes()})
    relisted = list_shards("hf://datasets/org/shards/*.tar")
    with make_pipeline(relisted, cache=cache, state=state) as resumed:
      assert_same(take(resumed, 2), after[:2])
      assert resumed.state()["shard"] in relisted  # the next shard, read at the new commit
  cache.close()


@pytest.mark.parametrize("name, cause, attempts", [
    ("unavailable.tar", "ConnectionError: 503 Service Unavailable for unavailable.tar", 3),
    # No retry gets past a refusal (an expired token): given up at once (found by review).
    ("denied.tar", "PermissionError: 401 Unauthorized for denied.tar: is the token expired?", 1)])
def test_a_failed_download_says_why_and_retries_wait_longer_each_time(tmp_path, name, cause, attempts):
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=1, per_shard=4))
  StallingFileSystem.FILES[name] = pathlib.Path(local[0]).read_bytes()
  (StallingFileSystem.DENIED if name == "denied.tar" else StallingFileSystem.UNAVAILABLE).add(name)
  url = f"stalling://{name}"
  events = []
  cache = ShardCache(str(tmp_path / "cache"), retries=3, retry_wait=0.2)
  failure = rf"without one usable sample.*Download failures: stalling://{name}: {cause[:30]}"
  with (make_pipeline([url], cache=cache, on_skip=lambda *event: events.append(event)) as pipeline,
        pytest.raises(RuntimeError, match=failure)):
    next(pipeline)
  # The skip, with its cause, reaches the caller before the error that ended the reader.
  assert events == [("unreadable_shard", "", url, f"download failed: {cause}")]
  opens = StallingFileSystem.OPENS[name]
  gaps = [b - a for a, b in zip(opens, opens[1:], strict=False)]
  assert len(opens) == attempts
  assert attempts == 1 or (gaps[0] >= 0.1 and gaps[1] >= 0.2), gaps  # about 0.2 s, then 0.4 s (jittered by half)


def test_a_download_that_stalls_halfway_goes_on_from_there_and_its_late_bytes_are_dropped(tmp_path):
  """The retry of a stalled download goes on from the bytes the stalled attempt wrote; that attempt's thread, still
  blocked in its read, may return later with bytes of its own, which must touch neither the shard nor its copy."""
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=1, per_shard=4))
  data = StallingFileSystem.FILES["half.tar"] = pathlib.Path(local[0]).read_bytes()
  released = StallingFileSystem.HALF_THEN_HANG["half.tar"] = threading.Event()
  cache = ShardCache(str(tmp_path / "cache"), stall_timeout=0.3, retries=2, retry_wait=0)
  path = cache.fetch("stalling://half.tar")
  assert pathlib.Path(path).read_bytes() == data
  assert StallingFileSystem.SERVED["half.tar"] == [len(data) - len(data) // 2]  # the retry read the second half
  released.set()  # the stalled attempt returns its junk now
  time.sleep(0.3)
  assert pathlib.Path(path).read_bytes() == data and cache_files(tmp_path / "cache") == [os.path.basename(path)]


def test_a_shard_fetched_ahead_is_retried_before_the_reader_reaches_it(tmp_path, caplog):
  """The retries ran in `fetch`: a download fetched ahead whose attempt failed early waited for the reader to reach
  its shard before its retry, and the reader then waited for the retry (found by review). It is retried in the
  background, after the same wait, and is complete before the reader asks for it."""
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=2, per_shard=4))
  urls = []
  for path in local:
    StallingFileSystem.FILES[os.path.basename(path)] = pathlib.Path(path).read_bytes()
    urls.append(f"stalling://{os.path.basename(path)}")
  StallingFileSystem.CUT_SHORT["train-00001.tar"] = 1
  cache = ShardCache(str(tmp_path / "cache"), prefetch=1, retries=3, retry_wait=0.05)
  with caplog.at_level(logging.WARNING):
    cache.fetch(urls[0], upcoming=urls[1:])
    wait_for(lambda: os.path.exists(cache.local_path(urls[1])), timeout=10)
  assert len(StallingFileSystem.OPENS["train-00001.tar"]) == 2
  assert f"download 1 of 3 of shard {urls[1]} failed (OSError: the download ended after" in caplog.text
  assert pathlib.Path(cache.fetch(urls[1])).read_bytes() == StallingFileSystem.FILES["train-00001.tar"]
  cache.close()


def test_a_shard_fetched_ahead_whose_link_stalls_is_retried_before_the_reader_reaches_it(tmp_path):
  """A stall was noticed only by a reader waiting for its shard: a shard fetched ahead whose link stalled sat there
  until the reader came to it, which then waited for the whole retry (a data stall of a pod). Each attempt's watch
  fails it after stall_timeout, whether a reader waits or not, and the retry is complete before the reader asks."""
  StallingFileSystem.FILES["a.tar"] = b"the shard read now"
  StallingFileSystem.FILES["b.tar"] = data = np.random.default_rng(0).bytes(1 << 20)
  StallingFileSystem.STALLS["b.tar"] = 1
  cache = ShardCache(str(tmp_path / "cache"), prefetch=1, stall_timeout=0.3, retries=3, retry_wait=0.05)
  cache.fetch("stalling://a.tar", upcoming=["stalling://b.tar"])
  wait_for(lambda: os.path.exists(cache.local_path("stalling://b.tar")), timeout=10)
  opens = StallingFileSystem.OPENS["b.tar"]
  assert len(opens) == 2 and 0.3 <= opens[1] - opens[0] < 3
  assert pathlib.Path(cache.fetch("stalling://b.tar")).read_bytes() == data
  cache.close()


def test_a_cache_directory_that_cannot_be_made_is_an_error_naming_it_not_a_spin(tmp_path):
  """data.cache_dir under a link to a disk that is not mounted: the claim of the directory retried its making for
  ever, at full CPU, and no close could stop it (found by review). A few tries, then the cache's own error."""
  (tmp_path / "disk").symlink_to(tmp_path / "not-mounted")
  StallingFileSystem.FILES["a.tar"] = b"shard bytes"
  cache = ShardCache(str(tmp_path / "disk" / "train-0123456789ab-process_0" / "stream_0"))
  started = time.monotonic()
  with pytest.raises(CacheWriteError, match=r"cannot make the shard cache .*/disk/train-0123456789ab-process_0/"
                                            r"stream_0 \(FileNotFoundError: .* check data.cache_dir"):
    cache.fetch("stalling://a.tar")
  assert time.monotonic() - started < 5


def test_a_retry_that_cannot_start_gives_the_shard_up_instead_of_waiting_for_ever(tmp_path, monkeypatch):
  """A failed attempt's retry waits on a timer's thread; when that thread could not start (no thread to be had,
  e.g. with many attempts stalled in network reads), the download waited for a retry that never came, and its reader
  with it, for ever (found by review). The shard is given up, naming why."""
  StallingFileSystem.FILES["a.tar"] = b"shard bytes"
  StallingFileSystem.UNAVAILABLE.add("a.tar")

  def cannot_start(timer):
    raise RuntimeError("can't start new thread")

  monkeypatch.setattr(threading.Timer, "start", cannot_start)
  cache = ShardCache(str(tmp_path / "cache"), stall_timeout=0.4, retries=3, retry_wait=0.05)
  reader = InBackground("reader", lambda: cache.fetch("stalling://a.tar"), daemon=True)
  assert reader.result(timeout=10) is None
  assert cache.failures["stalling://a.tar"].endswith("its retry could not start (RuntimeError: can't start new thread)")
  cache.close()


def test_a_stall_found_as_the_attempt_completes_does_not_fail_it(tmp_path, monkeypatch):
  """The reader's stall check decided under the download's lock, then failed the attempt after leaving it: an
  attempt that completed in between was failed all the same: on its last try the complete shard was given up (and
  left in the cache for good), with tries left it was downloaded again after it had been read (found by review; the
  interleaving is forced here: the check of the file's version after its last byte is slower than the stall
  timeout, and the failure of the stall waits until the attempt is done)."""
  StallingFileSystem.FILES["a.tar"] = data = np.random.default_rng(0).bytes(3 << 20)
  real_version, real_failed, versions = cache_module._file_version, cache_module._Download._failed, []

  def slow_second_version(info):  # each attempt asks it as it opens the file and after its last byte
    versions.append(1)
    if len(versions) % 2 == 0:
      time.sleep(1.0)
    return real_version(info)

  def failed_once_done(download, attempt_id, error, cause):
    if error is None:  # a stall found by the reader
      download.done.wait(5)
    real_failed(download, attempt_id, error, cause)

  monkeypatch.setattr(cache_module, "_file_version", slow_second_version)
  monkeypatch.setattr(cache_module._Download, "_failed", failed_once_done)
  for retries in (1, 3):
    StallingFileSystem.OPENS.clear()
    cache = ShardCache(str(tmp_path / f"cache_{retries}"), stall_timeout=0.5, retries=retries, retry_wait=0.05)
    path = cache.fetch("stalling://a.tar")
    assert path is not None and pathlib.Path(path).read_bytes() == data and cache.failures == {}
    cache.release("stalling://a.tar")
    time.sleep(0.5)  # a retry, had one been started, would download it again now
    cache.close()
    assert len(StallingFileSystem.OPENS["a.tar"]) == 1 and cache_files(cache.directory) == []


def test_a_download_that_ends_early_is_retried_not_presented_as_complete(tmp_path):
  """Retried from where it ended: a retry of a GB shard cut off near its end fetched the whole GB again."""
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=1, per_shard=4))
  StallingFileSystem.FILES["cut.tar"] = pathlib.Path(local[0]).read_bytes()
  StallingFileSystem.CUT_SHORT["cut.tar"] = 1
  cache = ShardCache(str(tmp_path / "cache"), retries=2, retry_wait=0)
  path = cache.fetch("stalling://cut.tar")
  assert pathlib.Path(path).read_bytes() == StallingFileSystem.FILES["cut.tar"]
  assert len(StallingFileSystem.OPENS["cut.tar"]) == 2
  size = len(StallingFileSystem.FILES["cut.tar"])
  assert StallingFileSystem.SERVED["cut.tar"] == [size // 2, size - size // 2]  # the second went on from the first
  StallingFileSystem.CUT_SHORT["short.tar"] = 5
  StallingFileSystem.FILES["short.tar"] = b"x" * 1000
  assert cache.fetch("stalling://short.tar") is None
  assert cache.failures["stalling://short.tar"] == "OSError: the download ended after 500 of its 1000 bytes"


class _FullAtFlush:
  """A file of a disk that fills up as its buffered bytes are written (at a flush, or the flush of its close)."""

  def __init__(self, *args, **kwargs):
    self._file = open(*args, **kwargs)  # noqa: SIM115 — closed by close()

  def __getattr__(self, name):
    return getattr(self._file, name)

  def flush(self):
    raise OSError(errno.ENOSPC, "No space left on device")

  def close(self):
    try:
      self.flush()
    finally:
      self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@pytest.mark.parametrize("fails_at", ["open", "flush"])
def test_a_cache_that_cannot_be_written_stops_the_reader_with_an_error_naming_it(tmp_path, monkeypatch, fails_at):
  """A full disk is not the shards' fault: skipping them as unreadable would train on part of the data. Found when
  the last buffered bytes were written (at the file's close), it was taken for the download's error, retried, and the
  shard skipped (found by review)."""
  StallingFileSystem.FILES["a.tar"] = b"x" * 100

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(cache_module, "open", full_disk if fails_at == "open" else _FullAtFlush, raising=False)
  cache = ShardCache(str(tmp_path / "cache"), retry_wait=0)
  with pytest.raises(CacheWriteError, match=r"No space left on device.*cache.*data\.cache_dir"):
    cache.fetch("stalling://a.tar")
  assert len(StallingFileSystem.OPENS["a.tar"]) == 1  # not retried: no retry can help
  assert not cache_files(tmp_path / "cache")


def test_remote_shards_need_a_cache(tmp_path):
  """Read without the cache, a stalled remote shard would block its reader with no timeout."""
  with pytest.raises(ValueError, match="data.cache_dir"):
    StreamSet(shards=["stalling://a.tar", "stalling://b.tar"], batch_size=2, num_streams=1, streams=range(1),
              cache_dir=None, latent_dim=8, max_text_len=32, max_frames=32, max_ref_frames=16,
              pad_latent=np.zeros(8, np.float32), seed=0)


def test_gs_urls_are_remote_and_gcsfs_is_installed(monkeypatch):
  """gs:// shards and checkpoints need gcsfs (fsspec's and etils' gs:// filesystem); telling a URL remote must not
  make that filesystem (offline, it looks for credentials for 15 s)."""
  gcs = fsspec.get_filesystem_class("gs")
  assert gcs.__module__.startswith("gcsfs")
  gcs.clear_instance_cache()

  def made(*args, **kwargs):
    raise AssertionError("is_local made a gs:// filesystem")

  monkeypatch.setattr(gcs, "__init__", made)
  assert not is_local("gs://bucket/train-000.tar") and not is_local("hf://datasets/org/name/a.tar")
  assert is_local("/data/a.tar") and is_local("file:///data/a.tar")


def test_the_sample_examples_skip_a_stalled_remote_shard(tmp_path):
  """The training-time samples' held-out examples are read at launch: a stalled shard must not hold it up."""
  local = list_shards(write_synthetic_shards(tmp_path / "shards", num_shards=2, per_shard=4))
  for index, path in enumerate(local):
    StallingFileSystem.FILES[f"eval{index}.tar"] = pathlib.Path(path).read_bytes()
  StallingFileSystem.STALLS["eval0.tar"] = 1000
  examples = examples_from_shards("stalling://eval0.tar,stalling://eval1.tar", 3, 8, stall_timeout=0.2, retries=2)
  assert len(examples) == 3 and len(StallingFileSystem.OPENS["eval0.tar"]) == 2


def test_bad_cache_arguments_are_errors(tmp_path):
  with pytest.raises(ValueError, match="download_retries"):
    ShardCache(str(tmp_path), retries=0)


class _HttpError(Exception):
  def __init__(self, code):
    super().__init__(f"HTTP {code}")
    self.code = code


@pytest.mark.parametrize("error, permanent", [
    (FileNotFoundError("gone"), True), (PermissionError("401 Unauthorized"), True), (_HttpError(403), True),
    (_HttpError(404), True), (_HttpError(429), False), (_HttpError(503), False), (ConnectionError("reset"), False),
    (OSError("the download ended after 10 of its 20 bytes"), False), (ValueError("unknown"), False)])
def test_only_errors_no_retry_can_pass_are_permanent(error, permanent):
  assert cache_module.is_permanent(error) is permanent


def test_a_shard_gcs_refuses_to_read_is_given_up_at_once(tmp_path):
  """gcsfs raises a 403 as a plain OSError("Forbidden: ..."), without its status: it was retried
  data.download_retries times (about 90 s of waits per shard with the default 8), e.g. for an account that may list
  the bucket (the launch passes) but not read its objects (found by review)."""
  with remote_file(tmp_path, "gs", "shard.tar", b"shard bytes") as (server, url):
    server.denied.add("storage.objects.get")
    cache = ShardCache(str(tmp_path / "cache"), retries=8, retry_wait=0.5)
    start = time.monotonic()
    assert cache.fetch(url) is None
    assert time.monotonic() - start < 5
  assert cache.failures[url].startswith("OSError: Forbidden: ") and "storage.objects.get" in cache.failures[url]
  assert cache_module.is_permanent(ValueError("Bad Request: gs://b/o invalid")) is True

