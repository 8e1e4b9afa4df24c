"""The tar shard format (DESIGN §6): writing shards and the sample record.

A sample is three adjacent tar members sharing a key without dots: `{key}.npy` (target latent [T, D] float16),
`{key}.ref.npy` (speaker reference latent [Ts, D] float16) and `{key}.json` (metadata with at least "text").
Reading validates every sample and reports a malformed one through a callback instead of failing, because one bad
sample (or shard) must never stop a pod-wide training run (DESIGN §5).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import io
import json
import sys
import tarfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
from absl import logging

from echo_jax import storage
from echo_jax.data.cache import describe, is_local, is_transient, retry_wait_s
from echo_jax.data.hf_urls import HF_REVISION, HUB_COMMIT


@contextlib.contextmanager
def _hidden_module(name: str) -> Iterator[None]:
  """Makes `import name` raise ModuleNotFoundError inside the block (unless it is imported already): Python stops at
  a None entry in sys.modules."""
  if name in sys.modules:
    yield
    return
  sys.modules[name] = None  # type: ignore[assignment]
  try:
    yield
  finally:
    if sys.modules.get(name, ...) is None:
      del sys.modules[name]


# webdataset imports torch whenever it is installed, for stand-ins of torch's DataLoader and Tensor that it uses
# without torch too. We use none of its torch parts, and torch must not load at runtime: on an H200 host with torch
# installed, that import took 3.9-4.6 s of a 15-18 s warm restart of echo_1p3b (TPU VM images often carry torch too).
with _hidden_module("torch"):
  import webdataset as wds

# on_skip(reason, key, shard): called once per skipped sample (key "" when a whole shard or its tail is skipped).
SkipCallback = Callable[[str, str, str], None]

# Member name suffix -> sample part. ".ref.npy" comes first so that it is not taken for ".npy".
_SUFFIXES = ((".ref.npy", "ref"), (".npy", "latent"), (".json", "json"))
# float16 values whose exponent bits are all ones, i.e. whose magnitude bits are at least 0x7C00, are inf or NaN.
_F16_EXPONENT_MASK = 0x7C00
_F16_MAGNITUDE_MASK = 0x7FFF
# A shard listing that fails transiently is tried this often in all, the retries after about 1, 2 and 4 s
# (`cache.retry_wait_s`): at most 7 s of waiting, enough for a store's brief outage, short for a launch.
LIST_ATTEMPTS = 4
LIST_RETRY_WAIT_S = 1.0
# A reference is patched by 4 frames in the speaker encoder (DESIGN §3); fewer frames give no patch at all.
MIN_REF_FRAMES = 4
# The block that ends a tar archive.
_END_BLOCK = bytes(tarfile.BLOCKSIZE)


@dataclasses.dataclass
class Sample:
  key: str
  latent: np.ndarray  # [T, D] float16
  ref: np.ndarray  # [Ts, D] float16
  meta: dict[str, Any]

  @property
  def text(self) -> str:
    return self.meta["text"]


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


def write_shard(path: str, samples: Iterable[Sample]) -> int:
  """Writes `samples` to the tar shard `path`, a local file (a path or a file:// URL), and returns how many were
  written; a URL of another filesystem is refused with a ValueError.

  The shard appears under its name only when complete (written to a temporary name, then renamed), so a reader
  or a crashed writer never leaves a half-written shard that looks finished. The bytes depend only on the samples
  (fixed mtime and owner), so the same samples always give an identical shard.
  """
  if not is_local(path):
    # Not uploaded through fsspec: that is whole-or-nothing on some stores only; the stores' own copy tools are.
    raise ValueError(f"write_shard writes local files, not {path!r}: write the shard to a local path, then copy it "
                     "there (gcloud storage cp SHARD gs://BUCKET/...; hf upload --repo-type=dataset ORG/NAME SHARD)")
  path = fsspec.core.strip_protocol(path)  # file:///data/a.tar is /data/a.tar, not ./file:/data/a.tar
  count = 0
  with storage.whole_file(path) as partial, open(partial, "wb") as stream:
    writer = wds.TarWriter(stream, user="echo", group="echo", mtime=0.0, encoder=False)
    for sample in samples:
      if "." in sample.key or not sample.key:
        raise ValueError(f"sample key {sample.key!r} is empty or contains a dot; tar shard keys must not")
      if "text" not in sample.meta:
        raise ValueError(f"sample {sample.key!r} has no 'text' in its metadata")
      writer.write({
          "__key__": sample.key,
          "npy": _npy_bytes(np.asarray(sample.latent, np.float16)),
          "ref.npy": _npy_bytes(np.asarray(sample.ref, np.float16)),
          "json": json.dumps(sample.meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
      })
      count += 1
    writer.close()
  return count


def list_shards(spec: str | Sequence[str]) -> list[str]:
  """Returns the sorted, de-duplicated shard paths named by `spec`.

  `spec` is a comma-separated string or a sequence of items; each item is a path or a glob pattern, local or any
  fsspec URL (gs://, hf://, memory://, ...). Every item must name at least one existing file, so that a typo fails
  at launch rather than as an epoch of skipped shards. A listing that fails transiently (`cache.is_transient`: a
  lost connection, a timeout, HTTP 408, 429 or 5xx) is tried LIST_ATTEMPTS times in all; any other failure, and an
  item that matches no file, fails at once.

  An hf:// item is listed at the commit its revision names now (its @REVISION, a branch, tag or commit; main when
  it has none), resolved once per repository and revision in a listing, and its URLs name that commit
  (hf://datasets/ORG/NAME@SHA/PATH): every later read of them reads that snapshot, whatever is committed to the
  dataset meanwhile. The order is that of the URLs without their revision (`without_revision`), so that a listing at
  a newer commit of the same files gives the same list but for the commit.
  """
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  items = [item.strip() for item in items if item.strip()]
  if not items:
    raise ValueError(f"shard spec {spec!r} names no shards")
  paths = set()
  commits: dict[tuple[str, str, str], str] = {}  # (repo type, repo, revision) -> its commit
  for item in items:
    fs, fs_path = fsspec.core.url_to_fs(item)
    for attempt in range(1, LIST_ATTEMPTS + 1):
      try:
        at = _at_commit(fs, fs_path, item, spec, commits) if fsspec.utils.get_protocol(item) == "hf" else fs_path
        matches, why = _list_item(fs, at, item)
        break
      except Exception as error:
        if not is_transient(error):
          raise
        if attempt == LIST_ATTEMPTS:
          raise OSError(f"could not list shard spec item {item!r} (from {spec!r}): {attempt} attempts failed, the "
                        f"last with {describe(error)}; check that the store can be reached, then relaunch") from error
        wait = retry_wait_s(attempt, LIST_RETRY_WAIT_S, error)
        logging.warning("listing shard spec item %r failed (attempt %d of %d: %s); retrying in %.1f s", item,
                        attempt, LIST_ATTEMPTS, describe(error), wait)
        time.sleep(wait)
    if not matches:
      raise FileNotFoundError(f"shard spec item {item!r} (from {spec!r}) matches no file{why}")
    local = "file" in fs.protocol
    paths.update(match if local else fs.unstrip_protocol(match) for match in matches)
  for (_, repo, revision), sha in sorted(commits.items()):
    logging.info("listed the shards of %s at its commit %s (revision %s)", repo, sha, revision)
  return sorted(paths, key=lambda path: (without_revision(path), path))


def without_revision(path: str) -> str:
  """`path` without the revision of an hf:// URL (hf://datasets/ORG/NAME@REV/PATH is hf://datasets/ORG/NAME/PATH);
  any other path as it is. What names a shard across launches, which list the same dataset at different commits."""
  return HF_REVISION.sub(r"\1", path, count=1)


def hf_revisions(paths: Sequence[str]) -> list[str]:
  """The repositories with the revision that the hf:// URLs among `paths` name (hf://datasets/ORG/NAME@SHA for a
  `list_shards` listing), sorted."""
  return sorted({match.group(0) for path in paths if (match := HF_REVISION.match(path))})


def _at_commit(fs: fsspec.AbstractFileSystem, fs_path: str, item: str, spec: str | Sequence[str],
               commits: dict[tuple[str, str, str], str]) -> str:
  """`fs_path` of the hf:// item `item` (on `fs`, huggingface_hub's HfFileSystem) at the commit its revision names
  now, which `commits` keeps for the rest of the listing: a branch or tag moves with each commit to the dataset."""
  from huggingface_hub import HfApi
  from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
  from huggingface_hub.hf_file_system import HfFileSystemResolvedPath

  try:
    resolved = fs.resolve_path(fs_path)  # it asks the Hub whether the repository and the revision exist
    key = (resolved.repo_type, resolved.repo_id, resolved.revision)
    if key not in commits:
      commits[key] = (resolved.revision if HUB_COMMIT.fullmatch(resolved.revision) else
                      HfApi(endpoint=fs.endpoint, token=fs.token).repo_info(
                          resolved.repo_id, repo_type=resolved.repo_type, revision=resolved.revision).sha)
  except (FileNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as error:
    # resolve_path raises a FileNotFoundError that names the path alone, with the Hub's error as its cause.
    cause = error.__cause__ if isinstance(error.__cause__, RepositoryNotFoundError | RevisionNotFoundError) else error
    named = HF_REVISION.match(item)
    if isinstance(cause, RevisionNotFoundError) and named:
      raise FileNotFoundError(
          f"shard spec item {item!r} (from {spec!r}) names revision {urllib.parse.unquote(named.group(2))!r} of "
          f"{named.group(1)}, which the Hub does not have ({describe(cause)}); name one of its branches, tags or "
          "commits after the '@', or none for main") from error
    if isinstance(cause, RepositoryNotFoundError):
      raise FileNotFoundError(
          f"shard spec item {item!r} (from {spec!r}) names a repository that the Hub does not have or that this "
          f"login may not read ({describe(cause)}); check the name (hf://datasets/ORG/NAME/... for a dataset) and "
          "the token (HF_TOKEN or `hf auth login`)") from error
    raise
  return HfFileSystemResolvedPath(resolved.repo_type, resolved.repo_id, commits[key], resolved.path_in_repo).unresolve()


def _list_item(fs: fsspec.AbstractFileSystem, fs_path: str, item: str) -> tuple[list[str], str]:
  """The files that the spec item `item` (`fs_path` on `fs`) names, and when there are none, why (for the error)."""
  if glob.has_magic(fs_path):
    try:  # files only: a directory the pattern also matches would be an unreadable shard
      return [path for path, info in fs.glob(fs_path, detail=True).items() if info.get("type") == "file"], ""
    except FileNotFoundError as error:  # some filesystems (hf://) raise for a pattern under a missing directory
      return [], f" ({error})"
  # `info`, not `isfile`: fsspec's isfile answers False for any error, a lost connection too, which retries miss.
  try:
    kind = fs.info(fs_path)["type"]
  except FileNotFoundError:
    return [], ""
  if kind == "directory":
    return [], f": it is a directory; name its shards, e.g. {item.rstrip('/')}/*.tar"
  return ([fs_path], "") if kind == "file" else ([], "")


def _split_member(name: str) -> tuple[str, str | None]:
  for suffix, part in _SUFFIXES:
    if name.endswith(suffix):
      return name[: -len(suffix)], part
  return name.split(".", 1)[0], None


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
  """Parses a .npy header (magic through the header dict) into (shape, fortran_order, dtype, payload offset).

  numpy parses the dict with ast.literal_eval (about 20 us); shards repeat a few hundred distinct shapes, so the
  cache makes this nearly free.
  """
  stream = io.BytesIO(header)
  version = np.lib.format.read_magic(stream)
  if version == (1, 0):
    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
  elif version == (2, 0):
    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
  else:
    raise ValueError(f"unsupported .npy format version {version}")
  if dtype.hasobject:
    raise ValueError("object arrays are not allowed")
  return shape, fortran_order, dtype, stream.tell()


def _parse_npy(data: bytes) -> np.ndarray:
  """Parses .npy bytes into a read-only view of `data`.

  np.load on a BytesIO copies the payload twice; numpy's own header reader plus np.frombuffer give the array
  without a copy, which matters at hundreds of MB/s.
  """
  if len(data) < 12 or data[6:8] not in (b"\x01\x00", b"\x02\x00"):
    raise ValueError("not a .npy file of format version 1 or 2")
  size_bytes = 2 if data[6] == 1 else 4
  header_end = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
  shape, fortran_order, dtype, offset = _npy_header(data[:header_end])
  count = int(np.prod(shape, dtype=np.int64))
  array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
  return array.reshape(shape, order="F" if fortran_order else "C")


def _check_latent(data: bytes, latent_dim: int | None) -> tuple[np.ndarray | None, str]:
  """Returns (array, "") for a valid [T, D] float16 latent with T >= 1, else (None, reason)."""
  try:
    array = _parse_npy(data)
  except (ValueError, OverflowError):  # OverflowError: a header whose shape overflows 64 bits
    return None, "bad_npy"
  if array.ndim != 2:
    return None, "bad_ndim"
  if array.dtype != np.float16:
    return None, "bad_dtype"
  if latent_dim is not None and array.shape[1] != latent_dim:
    return None, "bad_latent_dim"
  if array.shape[0] == 0:
    return None, "empty_latent"
  # A test of the magnitude bits: over 10x faster than np.isfinite, which has no vectorised float16 loop.
  if (array.view(np.uint16) & _F16_MAGNITUDE_MASK).max() >= _F16_EXPONENT_MASK:
    return None, "non_finite"
  return array, ""


def _check_meta(data: bytes) -> tuple[dict[str, Any] | None, str]:
  try:
    meta = json.loads(data.decode("utf-8"))
  except UnicodeDecodeError:
    return None, "bad_utf8"
  except (ValueError, RecursionError):  # RecursionError: arrays or objects nested thousands deep
    return None, "bad_json"
  if not isinstance(meta, dict):
    return None, "bad_json"
  text = meta.get("text")
  if not isinstance(text, str) or not text.strip():
    return None, "empty_text"
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # A JSON escape of a lone surrogate decodes but is not valid UTF-8.
    return None, "bad_utf8"
  return meta, ""


def _make_sample(key: str, parts: dict[str, bytes], latent_dim: int | None) -> tuple[Sample | None, str]:
  if not key or "." in key:
    return None, "bad_key"
  for part, reason in (("latent", "missing_npy"), ("ref", "missing_ref"), ("json", "missing_json")):
    if part not in parts:
      return None, reason
  meta, reason = _check_meta(parts["json"])
  if meta is None:
    return None, reason
  latent, reason = _check_latent(parts["latent"], latent_dim)
  if latent is None:
    return None, reason
  ref, reason = _check_latent(parts["ref"], latent.shape[1])
  if ref is None:
    return None, f"ref_{reason}"
  if ref.shape[0] < MIN_REF_FRAMES:
    return None, "ref_too_short"
  return Sample(key=key, latent=latent, ref=ref, meta=meta), ""


def iter_shard(path: str, on_skip: SkipCallback, *, latent_dim: int | None = None) -> Iterator[Sample]:
  """Yields the valid samples of the tar shard `path` (any fsspec URL) in file order.

  Arrays of the yielded samples are read-only float16 views of the member bytes. Every malformed sample is
  skipped and reported as `on_skip(reason, key, path)`, never raised. Reasons:
    unreadable_shard (key ""): the shard cannot be opened;
    bad_tar: the tar is truncated or corrupt; the sample being read (key "" when the break follows a whole
      sample, which is read) and the rest of the shard are skipped;
    bad_key: empty key or a key with a dot; unexpected_member / duplicate_member: a member that is not one of the
      three parts, or a part given twice; missing_npy / missing_ref / missing_json;
    bad_npy, bad_ndim, bad_dtype (not float16), bad_latent_dim (not `latent_dim`), empty_latent, non_finite — and
      the same with a "ref_" prefix for the reference; ref_too_short (fewer than MIN_REF_FRAMES frames);
    bad_utf8, bad_json (unparsable or not an object), empty_text (missing, not a string, or blank).
  """
  try:
    stream = fsspec.open(path, "rb").open()
  except Exception:  # Any failure to open (missing file, permissions, network) skips this shard only.
    on_skip("unreadable_shard", "", path)
    return
  with stream:
    key, parts, problem = None, {}, ""
    members = _tar_members(stream)
    while True:
      try:
        member, broken = next(members, None), False
      except Exception:  # Whatever breaks the tar stream (truncation, bad header, bad gzip) ends this shard.
        member, broken = None, True
      member_key, part = _split_member(member[0]) if member else (None, None)
      if key is not None and member_key != key:  # Parts of a sample are adjacent: the previous one has ended.
        # Cut short by a break, it is the sample blamed; whole (its parts were read to their ends), it is read.
        if broken and len(parts) < len(_SUFFIXES):
          on_skip("bad_tar", key, path)
          return
        sample, reason = (None, problem) if problem else _make_sample(key, parts, latent_dim)
        if sample is None:
          on_skip(reason, key, path)
        else:
          yield sample
        parts, problem = {}, ""
      if broken:
        on_skip("bad_tar", "", path)
        return
      if member is None:
        return
      key = member_key
      if part is None:
        problem = problem or "unexpected_member"
      elif part in parts:
        problem = problem or "duplicate_member"
      else:
        parts[part] = member[1]


def _tar_members(stream: Any) -> Iterator[tuple[str, bytes]]:
  """Yields (name, bytes) of the regular files of a tar stream in order.

  webdataset's tariterators.tar_file_iterator does this over tarfile's stream mode ("r|*"), which reads in 10 KB
  pieces and measured about 130 us per member here; tarfile's seekable mode takes about 60 us, a third of the
  whole per-sample budget, so it is used whenever the stream can seek.

  Raises tarfile.ReadError when the members end without the archive's end: tarfile takes a header block that is
  short, missing or unreadable (anywhere but at the start) for the end too, so a shard cut between two members, or
  inside a header, would otherwise read as complete with its tail silently gone.
  """
  last_header = [b""]

  class _Header(tarfile.TarInfo):
    """Keeps the last header block read: the one that ended the members once `next` returns None. A class per
    archive, since several threads read shards at once."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
      last_header[0] = buf
      return super().frombuf(buf, encoding, errors)

  with tarfile.open(fileobj=stream, mode="r:*" if stream.seekable() else "r|*", tarinfo=_Header) as tar:
    while (info := tar.next()) is not None:
      # TarFile keeps every TarInfo it has seen; dropping them keeps memory flat over a long shard.
      tar.members = []
      if info.isreg():
        yield info.name, tar.extractfile(info).read()
    # A complete archive ends with a zero block (writers add a second and pad to a 10240-byte record; those are
    # not required: a cut after the first zero block loses nothing).
    if last_header[0] != _END_BLOCK:
      raise tarfile.ReadError(f"the archive stops at byte {tar.offset} without its end-of-archive block: it is "
                              "truncated or corrupt")
