"""The run directory's own files (config.json, metrics.jsonl, events.jsonl, samples) written where the run directory
is: a local path, or a URL such as gs://BUCKET/run (any fsspec filesystem; Orbax writes the checkpoints itself).

An object store has neither rename nor append. A file is written whole in one upload, which the store shows whole or
not at all (locally: under a temporary name, then renamed). Bytes are appended to an object by uploading them as an
object of their own and composing the two (GCS's compose, gcsfs's `merge`): each append sends only the new bytes,
and the object only grows, so a reader (the dashboard) can go on reading from where it stopped.

`choose_gcs_client` (called when echo_jax is imported) settles which gcsfs class every gs:// URL reaches: this
module's files, shards, and Orbax's directories (etils' epath reaches GCS through fsspec's `gcs`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import posixpath
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import fsspec
from absl import logging
from etils import epath

from echo_jax.data.cache import describe, is_gcs, is_local
from echo_jax.errors import UserError

GCS_CLIENT_SWITCH = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"


def choose_gcs_client() -> None:
  """gs:// (and gcs://) reach gcsfs's JSON-API client, `gcsfs.core.GCSFileSystem`, unless the user set gcsfs's own
  switch GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT (then gcsfs's choice stands). gcsfs's default since 2026.3 first asks
  GCS's gRPC storage-control API each bucket's type, and does not remember a failed answer: where that API cannot be
  reached (an egress proxy, a VPC-SC perimeter, an emulator) every file operation first retries that lookup for up
  to 60 s (measured against tests/fake_gcs.py: 18-100 s per read or write). The JSON API is all this framework
  needs, and the one tensorstore writes the checkpoints through. A class registered by someone else is left alone."""
  if GCS_CLIENT_SWITCH in os.environ:
    return
  for protocol in ("gs", "gcs"):
    if protocol not in fsspec.registry:  # by its name, imported on first use (gcsfs takes 0.3 s; local runs skip it)
      fsspec.register_implementation(protocol, "gcsfs.core.GCSFileSystem", clobber=True)
    elif fsspec.registry[protocol].__module__.startswith("gcsfs."):  # gcsfs's default, imported already: replaced
      from gcsfs.core import GCSFileSystem  # noqa: PLC0415 — gcsfs is imported already
      fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)


def expand_home(path: str) -> str:
  """`path` with a leading `~` expanded where it is local. A shell leaves `--workdir=~/runs/x` as it is; fsspec
  expands it and open() and os.makedirs do not, so a run wrote half its files under a directory named `~` in the
  current one and failed checking the other half (found by review)."""
  return os.path.expanduser(path) if is_local(path) else path


def orbax_path(path: str) -> epath.Path:
  """`path` as Orbax (and etils' epath, which it uses) takes it: a URL (gs://...) as it is, a local path made
  absolute (Orbax refuses relative ones), `~` expanded."""
  return epath.Path(path if "://" in path else os.path.abspath(expand_home(path)))


def join(base: str, *names: str) -> str:
  """`base`/`names`, for a local path or a URL."""
  return os.path.join(base, *names) if is_local(base) else posixpath.join(base, *names)


@contextlib.contextmanager
def whole_file(path: str) -> Iterator[str]:
  """Yields where to write the local file `path` (beside it, its directories made); renamed to `path` when the block
  ends, deleted when it raises: `path` is never seen half-written, and a failed write leaves nothing."""
  partial = _partial_of(path)
  try:
    yield partial
    os.replace(partial, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(partial)
    raise


def write_bytes(path: str, data: bytes) -> None:
  """`data` as the file `path` (its directories made), never seen half-written: a failed write leaves nothing."""
  if is_local(path):
    with whole_file(path) as partial, open(partial, "wb") as f:
      f.write(data)
    return
  fs, target = fsspec.core.url_to_fs(path)
  fs.pipe_file(target, data)


def check_writable(path: str) -> None:
  """Raises OSError saying why when `write_bytes` could not write the local file `path` (a directory there, or a
  directory that cannot be made or written in), so that a long job fails before its work, not after. Nothing is
  left behind: a job that fails later (a checkpoint not found) must not leave the directories of its output, which
  `write_bytes` makes at the write. A remote path is not checked: an object store answers at the write."""
  if not is_local(path):
    return
  if os.path.isdir(path):
    raise IsADirectoryError(errno.EISDIR, "is a directory: give a file name in it", path)
  directory = os.path.dirname(os.path.abspath(path))
  existing = directory
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if existing == directory:
    probe = _partial_name(path)
    with open(probe, "wb"):
      pass
    os.remove(probe)
  else:  # a directory made and removed again where the write would make the first of its directories
    os.rmdir(tempfile.mkdtemp(prefix=".check_writable-", dir=existing))


def _partial_of(path: str) -> str:
  """Where `whole_file` writes the local file `path` before renaming it (its directories made)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return _partial_name(path)


def _partial_name(path: str) -> str:
  return f"{path}.partial"


def _asked_now(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
  """`path`'s fsspec filesystem and its path there, with what the filesystem knew of `path` forgotten: gcsfs (like
  other filesystems of object stores) answers from listings it made earlier, which miss what was written since."""
  fs, target = fsspec.core.url_to_fs(path)
  fs.invalidate_cache(target)
  return fs, target


def read_bytes(path: str) -> bytes:
  """The bytes of the file `path`, local or remote; FileNotFoundError when there is none."""
  fs, target = fsspec.core.url_to_fs(path)
  return fs.cat_file(target)


def remove(path: str) -> None:
  """Deletes the file `path`, local or remote."""
  fs, target = fsspec.core.url_to_fs(path)
  fs.rm_file(target)


def remove_if_possible(path: str) -> None:
  """Deletes the file `path` if it can; a failure is logged, and leaves a small file where it was."""
  try:
    remove(path)
  except Exception as error:  # noqa: BLE001 — best effort: the caller is on its way out with another error, or done
    logging.warning("could not delete %s (%s)", path, describe(error))


def exists(path: str) -> bool:
  """Whether `path` exists now, asked of the store (see `_asked_now`)."""
  fs, target = _asked_now(path)
  return fs.exists(target)


def size(path: str) -> int:
  """The size of `path` now, in bytes, asked of the store; FileNotFoundError when there is none."""
  fs, target = _asked_now(path)
  return fs.size(target)


def append_bytes(url: str, data: bytes, *, new: bool) -> None:
  """Appends `data` to the object `url` on remote storage (a local file is better held open in append mode); `new`
  says it is not there yet (the caller keeps track: asking the store each time would cost a request per append)."""
  fs, target = fsspec.core.url_to_fs(url)
  if new:
    fs.pipe_file(target, data)
  elif hasattr(fs, "merge"):  # gcsfs: compose server-side
    # A name of its own per append: a retried or concurrent append never composes another's bytes.
    chunk = f"{target}.append-{uuid.uuid4().hex}"
    fs.pipe_file(chunk, data)
    try:
      fs.merge(target, [target, chunk])
    finally:
      try:
        fs.rm_file(chunk)
      except Exception as error:  # noqa: BLE001 — the append itself is done: failing it would append it twice
        logging.warning("could not delete %s after appending it to %s (%s)", chunk, url, describe(error))
  else:  # no compose (e.g. Hugging Face): the whole file again
    fs.pipe_file(target, fs.cat_file(target) + data)


class RunDirectoryError(UserError, RuntimeError):
  """The run directory cannot hold a run: an operation that the run does there fails, or the hosts of a pod do not
  all see the same files there."""


class RunDirectoryInUseError(RunDirectoryError):
  """Another trainer holds the run directory (`RunDirectoryClaim`): its run log is not this launch's to write."""


def check_run_directory(directory: str, name: str) -> None:
  """Does with a file `name` in `directory` what a run does with its files there: creates one, replaces it
  (config.json at each launch; GCS counts a replacement as a deletion), appends to it (metrics.jsonl), reads it back
  and deletes it (old checkpoints). Raises RunDirectoryError naming the first operation that fails, at launch, not
  at the first checkpoint save, `ckpt_every` steps in (tensorstore replaces objects of a checkpoint as it writes it)."""
  path = join(directory, name)

  def append() -> None:
    if is_local(path):
      with open(path, "ab") as f:
        f.write(b"+")
    else:
      append_bytes(path, b"+", new=False)

  def read_back() -> None:
    if (read := read_bytes(path)) != b"2+":
      raise ValueError(f"read back {read!r} where b'2+' was written")

  for operation, do in (("create", lambda: write_bytes(path, b"1")), ("replace", lambda: write_bytes(path, b"2")),
                        ("append to", append), ("read back", read_back), ("delete", lambda: remove(path))):
    try:
      do()
    except Exception as error:
      if operation not in ("create", "delete"):
        remove_if_possible(path)
      raise RunDirectoryError(
          f"cannot {operation} a file in the run directory {directory} ({describe(error)}). A run creates, "
          "replaces, appends to, reads and deletes files there: check the path, and that this host's credentials "
          "may do all five (on GCS: roles/storage.objectUser on the bucket; objectCreator alone can neither "
          "replace nor delete)") from error


# Where process I of a run writes the error that stopped it (`metrics.record_process_error`), which the dashboard
# reads: only process 0 writes events.jsonl.
ERRORS_DIR = "errors"
PROCESS_ERROR_FILE = re.compile(r"^process_(\d+)\.json$")


def process_error_path(directory: str, process: int) -> str:
  return join(directory, ERRORS_DIR, f"process_{process}.json")


# A remote run directory's lease (`RunDirectoryClaim`): renewed this often, and taken as abandoned by a trainer on
# another machine once this long has passed since its last renewal.
LEASE_FILE = ".trainer.lease"
LEASE_RENEW_S = 60.0
LEASE_EXPIRES_S = 300.0
LEASE_RELEASE_WAIT_S = 10.0  # for a renewal under way when the claim is released
# A launch's tries at taking over a lease that is not live: one fails only when another write came between its read
# and its write (another launch taking it over), whose lease the next finds live.
LEASE_TAKE_TRIES = 3


class RunDirectoryClaim:
  """A trainer's claim on its run directory, held until `release()`: no other trainer writes there meanwhile.

  Two trainers writing one run directory (a relaunch while the last launch's trainers still run: its launcher
  killed, a second terminal, the same command started on a second slice) would overwrite each other's checkpoints
  and interleave their metrics. The second is refused instead, naming the first.

  - A local directory: each process `process` locks the file `.trainer.{process}.lock` there, which records who holds
    it; the kernel drops the lock when the process ends, even at a SIGKILL.
  - A remote one (gs://): an object store has no lock that a killed trainer releases, so process 0 of a launch holds
    a lease, the object `.trainer.lease` (who holds it, and when it was last renewed). A thread renews it every
    `LEASE_RENEW_S`. A lease is live while its trainer's pid runs (a trainer on this machine) or while it was
    renewed within `LEASE_EXPIRES_S` (a trainer elsewhere); a launch takes over a lease that is not (`took_over`
    says whose). A trainer whose lease another launch took over (it could not renew it for that long) finds it so
    at its next renewal and says so in `lost`: the Trainer then stops before its next save. The lease is replaced
    (taken over, or renewed) only if its object is still the one read, by its generation (GCS's precondition,
    decided by the store): of two launches that take over one expired lease at once, one gets it and the other is
    refused, naming it; a renewal never overwrites a lease that another launch took after it was read, and finds it
    lost. (On a store that gives no generations, another fsspec filesystem, both launches can take it over; the next
    renewal of one of them finds the other's lease, and that one stops.)
  """

  def __init__(self, directory: str, process: int):
    self.directory = directory
    self.path = join(directory, f".trainer.{process}.lock")
    self.took_over: str | None = None
    self.lost: str | None = None
    self._file = None
    self._lease_id: str | None = None
    self._holder: dict = {}  # the lease's fields but its renewal time (`_take_lease`)
    self._renewing = threading.Event()
    self._renewer: threading.Thread | None = None
    if not is_local(directory):
      self.path = join(directory, LEASE_FILE)
      if process == 0:
        self._take_lease()
      return
    try:
      os.makedirs(directory, exist_ok=True)
      held = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 — held for the run; not truncated: the record stays
    except OSError as error:
      raise RunDirectoryError(f"cannot claim the run directory {directory} ({describe(error)})") from error
    try:
      fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      held.seek(0)
      holder = held.read().strip() or "a process that has just claimed it"
      held.close()
      raise self._in_use(f"process {process} of another trainer holds it ({holder})",
                         "locally: kill its pid; launch.sh stops stale trainers on a pod") from None
    except BaseException:
      held.close()
      raise
    held.truncate(0)
    held.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    held.flush()
    self._file = held

  def _in_use(self, holder: str, how_to_stop: str) -> RunDirectoryInUseError:
    return RunDirectoryInUseError(
        f"the run directory {self.directory} is in use: {holder}. Two trainers writing one run directory would "
        f"overwrite each other's checkpoints: stop that one ({how_to_stop}), or give another --workdir")

  def _lease_record(self) -> bytes:
    """This trainer's lease, renewed now: `_holder` (fixed for the process) and the time."""
    return json.dumps({**self._holder, "renewed": time.time()}).encode()

  def _create_lease(self) -> None:
    """Writes this trainer's lease where there is none; FileExistsError when there is (on GCS, decided by the store:
    of two launches creating it at once, one fails)."""
    fs, target = _asked_now(self.path)
    fs.pipe_file(target, self._lease_record(), mode="create")

  def _take_lease(self) -> None:
    self._lease_id = uuid.uuid4().hex
    self._holder = {"id": self._lease_id, "host": socket.gethostname(), "pid": os.getpid(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": _machine(),
                    "started": _process_start(os.getpid())}
    try:
      self._claim_lease()
    except RunDirectoryError:
      raise
    except Exception as error:
      raise RunDirectoryError(f"cannot claim the run directory {self.directory}: writing {self.path} failed "
                              f"({describe(error)})") from error
    self._renewer = threading.Thread(target=self._renew, name="run_directory_lease", daemon=True)
    self._renewer.start()

  def _claim_lease(self) -> None:
    """Creates this trainer's lease, or replaces one that is not live; RunDirectoryInUseError when one is (of two
    launches taking over one lease at once, the second finds the first's live at its next try)."""
    replacing = None  # whose lease the last try replaced, for `took_over`
    for _ in range(LEASE_TAKE_TRIES):
      try:
        self._create_lease()
        return
      except FileExistsError:
        pass
      holder, generation = _read_lease(self.path)
      if holder is not None and holder.get("id") == self._lease_id:  # the last try's went through (`_replace_lease`)
        self.took_over = replacing
        return
      if holder is not None and _lease_is_live(holder):
        raise self._in_use(f"another trainer holds its lease ({_describe_lease(holder)})",
                           f"or, if it is gone, wait until {LEASE_EXPIRES_S:.0f} s have passed since its last "
                           f"renewal, or delete {self.path}")
      replacing = _describe_lease(holder) if holder is not None else f"an unreadable {self.path}"
      try:
        _replace_lease(self.path, self._lease_record(), generation)
      except FileExistsError:
        continue
      self.took_over = replacing
      return
    raise RunDirectoryError(f"cannot claim the run directory {self.directory}: {self.path} was written between the "
                            f"read and the write of each of {LEASE_TAKE_TRIES} tries to take it over")

  def _renew(self) -> None:
    while not self._renewing.wait(LEASE_RENEW_S):
      try:
        holder, generation = _read_lease(self.path)
        if holder is None:  # deleted (by hand?): made again, unless another launch has just made its own
          with contextlib.suppress(FileExistsError):
            self._create_lease()
          holder, generation = _read_lease(self.path)
        if holder is not None and holder.get("id") == self._lease_id:
          try:
            _replace_lease(self.path, self._lease_record(), generation)
            continue
          except FileExistsError:  # written since it was read: by another launch that took it over, most likely
            holder, _ = _read_lease(self.path)
            # Deleted: made again at the next renewal. This trainer's: see `_replace_lease`.
            if holder is None or holder.get("id") == self._lease_id:
              continue
        self.lost = (f"another trainer took over the run directory {self.directory} "
                     f"({_describe_lease(holder) if holder else f'{self.path} is unreadable'})")
        logging.error("%s: this trainer stops at its next log step", self.lost)
        return
      except Exception as error:  # noqa: BLE001 — the store may answer again before the lease expires
        logging.warning("could not renew the lease %s (%s); another launch may take the run directory over once "
                        "%.0f s have passed since the last renewal", self.path, describe(error), LEASE_EXPIRES_S)

  def release(self) -> None:
    """Ends the claim. A local lock file stays (deleting it could let two later trainers lock different files); a
    lease still this trainer's is deleted (conditioned on its generation: not one another launch took over since the
    read), so that a relaunch elsewhere need not wait for it to expire."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._lease_id is not None:
      self._renewing.set()
      if self._renewer is not None:  # a renewal under way would make the lease again once it is deleted
        self._renewer.join(timeout=LEASE_RELEASE_WAIT_S)
      try:
        holder, generation = _read_lease(self.path)
        if self.lost is None and (holder or {}).get("id") == self._lease_id:
          _delete_lease(self.path, generation)
      except FileExistsError:  # another launch took the lease over since it was read: its lease now, kept
        pass
      except Exception as error:  # noqa: BLE001 — the run is over; a lease left behind expires by itself
        logging.warning("could not delete the lease %s (%s); a launch elsewhere can take the run directory over "
                        "once %.0f s have passed since its last renewal", self.path, describe(error), LEASE_EXPIRES_S)
      self._lease_id = None


def _read_lease(path: str) -> tuple[dict | None, str | None]:
  """(the lease record at `path`, None when there is none or it is unreadable (taken over then); the generation of
  its object, for `_replace_lease`: "0" where there is none, None where the store gives no generation)."""
  fs, target = _asked_now(path)
  gcs = is_gcs(fs)
  try:
    # The generation before the bytes: a lease written between the two then fails the replacement conditioned on it,
    # instead of being replaced on the word of the bytes before it.
    generation = fs.info(target)["generation"] if gcs else None
    data = fs.cat_file(target)
  except FileNotFoundError:
    return None, ("0" if gcs else None)
  try:
    record = json.loads(data)
  except ValueError:
    return None, generation
  return (record if isinstance(record, dict) else None), generation


def _replace_lease(path: str, data: bytes, generation: str | None) -> None:
  """Writes `data` as the lease `path` if its object is still of `generation`, as `_read_lease` found it ("0": there
  is none); FileExistsError when another write came between, decided by the store: of two launches replacing the
  lease they read, one fails. (FileExistsError too where this write went through but its answer was lost: gcsfs's
  retry finds the generation changed. The caller reads whose the lease is now.)

  GCS's precondition ifGenerationMatch, which gcsfs's writes set only to 0 (mode="create"): this upload, a media
  upload of GCS's JSON API, is asked through gcsfs's session (its credentials, endpoint and retries), which raises
  the store's 412 as FileExistsError. Where the store gives no generation (another fsspec filesystem: `generation`
  None), the lease is replaced without a condition: two launches taking over one expired lease at once can both
  take it, and the next renewal of one of them finds the other's lease."""
  if generation is None:
    write_bytes(path, data)
    return
  fs, target = fsspec.core.url_to_fs(path)
  bucket, key, _ = fs.split_path(target)
  # `_location` is private: the endpoint gcsfs's own uploads are sent to (gcsfs 2026.7.0, pinned in constraints.txt).
  fs.call("POST", f"{fs._location}/upload/storage/v1/b/{{}}/o", bucket, uploadType="media", name=key,
          ifGenerationMatch=generation, data=data, headers={"Content-Type": "application/json"})


def _delete_lease(path: str, generation: str | None) -> None:
  """Deletes the lease `path` if its object is still of `generation` (see `_replace_lease`); FileExistsError when
  another write came between (another launch that took it over: its lease is not this trainer's to delete). Without
  a generation (another fsspec filesystem), deleted without a condition."""
  if generation is None:
    remove(path)
    return
  fs, target = fsspec.core.url_to_fs(path)
  bucket, key, _ = fs.split_path(target)
  fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=generation, json_out=False)


def _lease_is_live(holder: dict) -> bool:
  """Whether the trainer of the lease record `holder` still runs: asked of the kernel when it ran on this one (same
  boot, same pid namespace: its pid, with the start time recorded, so that a pid used again since does not count),
  else whether it renewed the lease within LEASE_EXPIRES_S. The hostname alone proves neither: a machine started
  again, or a container of another pid namespace, can have this one's."""
  machine = _machine()
  if machine is not None and holder.get("machine") == machine:
    pid, started = holder.get("pid"), holder.get("started")
    return isinstance(pid, int) and pid != os.getpid() and started is not None and _process_start(pid) == started
  renewed = holder.get("renewed")
  return isinstance(renewed, (int, float)) and time.time() - renewed < LEASE_EXPIRES_S


def _machine() -> str | None:
  """This kernel's boot and this process's pid namespace, where a pid names one process; None where unknown."""
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
      return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
  except OSError:
    return None


def _process_start(pid: int) -> int | None:
  """When process `pid` started (clock ticks since boot, from /proc), or None when it does not run (or unknown)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22; the name before it may hold spaces
  except (OSError, IndexError, ValueError):
    return None


def _describe_lease(holder: dict) -> str:
  renewed = holder.get("renewed")
  ago = f", last renewed {time.time() - renewed:.0f} s ago" if isinstance(renewed, (int, float)) else ""
  return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}{ago}"
