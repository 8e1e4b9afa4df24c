"""Google Cloud Storage stood in for by a local directory (bucket NAME = ROOT/NAME), so that tests read and write
gs:// URLs with no network, through the real clients: `serve` answers over HTTP what tensorstore (Orbax's arrays),
google-cloud-storage (a bucket's settings, asked by Orbax) and gcsfs (fsspec's gs://: the run directory's own files,
the dashboard, and Orbax's small files through etils' epath) ask of GCS's JSON API. `register` points this process's
gcsfs at it; `subprocess_env` points all three clients of a test subprocess at it, with no test code in the
subprocess: gs:// there reaches the gcsfs class that `import echo_jax` chose, as in production.

gcsfs itself, not a local filesystem in its place, so that what it does beyond plain I/O is tested too: its listings
cache, above all, which keeps a directory's listing until told otherwise."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator

import fsspec
import stand_in
from conftest import REPO, cpu_env
from gcsfs.core import GCSFileSystem

from echo_jax import storage


@dataclasses.dataclass
class Server:
  url: str  # for `register` and `subprocess_env`
  served: list[str]  # the objects whose bytes were read, as BUCKET/NAME
  composed: list[str]  # the destination of each compose, as BUCKET/NAME
  # Resumable uploads by id: (bucket, name, ifGenerationMatch or None, the bytes so far).
  uploads: dict[str, tuple[str, str, str | None, bytearray]] = dataclasses.field(default_factory=dict)
  # IAM permissions the caller lacks, as GCS checks them: storage.objects.create for every write, and
  # storage.objects.delete for a DELETE and for a write that replaces an object (a compose onto one included).
  denied: set[str] = dataclasses.field(default_factory=set)
  # The last generation given: a write's time in ns, made to grow (a file's own mtime may not, within a clock tick,
  # and a conditional write would then pass on a generation that another write had replaced); and the lock under
  # which a write checks its precondition and writes.
  generation: int = 0
  writing: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class _JsonApi(stand_in.Handler):
  """What the clients ask of GCS's JSON API, over ROOT:
  GET /storage/v1/b/B: the bucket's metadata; GET /storage/v1/b/B/o?prefix=P[&delimiter=/]: the objects under P
  (with a delimiter, only those directly under it, and the "directories" below as prefixes);
  GET /storage/v1/b/B/o/O: the object's metadata, or (alt=media; also /download/storage/...) its bytes, a Range of
  them if asked; POST /upload/storage/v1/b/B/o?uploadType=media&name=O or uploadType=multipart (the name in the
  metadata part), either with ifGenerationMatch=G: write O (412 when G is not its generation; 0: it must not exist
  yet); uploadType=resumable: the same in a session of chunks (gcsfs's writes through open()); POST
  /storage/v1/b/B/o/O/compose: O becomes its sources' bytes in order; POST /storage/v1/b/B/o/O/rewriteTo/b/B2/o/O2:
  a copy; POST /storage/v1/b/B/o/O/moveTo/o/O2: a move; DELETE /storage/v1/b/B/o/O. An object's generation is its file's
  mtime, which each write sets above every generation given before (GCS's generations only grow), and a write checks
  its precondition and writes at once. A write, a delete or a read of an object's bytes that needs a permission of
  `Server.denied` is answered 403, with GCS's wording."""

  root: str
  gcs: Server  # (`server` is the handler's HTTP server)

  def _object(self, bucket: str, name: str) -> tuple[str, dict[str, str] | None]:
    """(the object's file, its metadata or None when there is no such object)."""
    path = os.path.join(self.root, bucket, name)
    if not os.path.isfile(path):
      return path, None
    return path, {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(os.path.getsize(path)),
                  "generation": str(os.stat(path).st_mtime_ns), "metageneration": "1"}

  def _refused(self, permission: str, bucket: str, name: str) -> bool:
    """Answers 403 and says so when the caller lacks `permission`."""
    if permission not in self.gcs.denied:
      return False
    self.reply(403, {"error": {"code": 403, "message": f"caller does not have {permission} access to the Google "
                               f"Cloud Storage object {bucket}/{name}. Permission '{permission}' denied on resource "
                               "(or it may not exist)."}})
    return True

  def _parse(self) -> tuple[list[str], dict[str, list[str]]]:
    """(the path's parts after /storage/v1/b/: [BUCKET], [BUCKET, "o"] or [BUCKET, "o", OBJECT], then for a compose
    a copy or a move the action: ["compose"], ["rewriteTo", BUCKET2, OBJECT2] or ["moveTo", BUCKET, OBJECT2];
    the query). Object names are unquoted."""
    url = urllib.parse.urlparse(self.path)
    path = url.path.removeprefix("/download").removeprefix("/upload")
    if not path.startswith("/storage/v1/b/"):
      return [], {}
    bucket, _, rest = path.removeprefix("/storage/v1/b/").partition("/")
    if not rest.startswith("o/"):
      return [bucket, rest] if rest else [bucket], urllib.parse.parse_qs(url.query)
    name, action = rest[2:], []
    if name.endswith("/compose"):
      name, action = name.removesuffix("/compose"), ["compose"]
    elif "/rewriteTo/b/" in name:
      name, target = name.split("/rewriteTo/b/")
      target_bucket, target_name = target.split("/o/", 1)
      action = ["rewriteTo", target_bucket, urllib.parse.unquote(target_name)]
    elif "/moveTo/o/" in name:
      name, target_name = name.split("/moveTo/o/")
      action = ["moveTo", bucket, urllib.parse.unquote(target_name)]
    return [bucket, "o", urllib.parse.unquote(name), *action], urllib.parse.parse_qs(url.query)

  def do_GET(self) -> None:
    parts, query = self._parse()
    if not parts or not os.path.isdir(os.path.join(self.root, parts[0])):
      self.reply(404)
      return
    bucket = parts[0]
    if len(parts) == 1:
      self.reply(200, {"kind": "storage#bucket", "name": bucket, "id": bucket})
    elif len(parts) == 2:
      self.reply(200, self._list(bucket, query.get("prefix", [""])[0], query.get("delimiter", [""])[0]))
    else:
      path, metadata = self._object(bucket, parts[2])
      if metadata is None:
        self.reply(404)
      elif query.get("alt") == ["media"] and self._refused("storage.objects.get", bucket, parts[2]):
        return
      elif query.get("alt") != ["media"]:
        self.reply(200, metadata)
      else:
        self.gcs.served.append(f"{bucket}/{parts[2]}")
        self.send_file(path, {"x-goog-generation": metadata["generation"]})

  def _list(self, bucket: str, prefix: str, delimiter: str) -> dict:
    base = os.path.join(self.root, bucket)
    names = sorted(os.path.relpath(os.path.join(folder, name), base).replace(os.sep, "/")
                   for folder, _, files in os.walk(base) for name in files)
    items, prefixes = [], set()
    for name in names:
      if not name.startswith(prefix):
        continue
      rest = name[len(prefix):]
      if delimiter and delimiter in rest:
        prefixes.add(prefix + rest.split(delimiter)[0] + delimiter)
      else:
        items.append(self._object(bucket, name)[1])
    # (an object deleted since the walk has no metadata: left out, as GCS would)
    return {"kind": "storage#objects", "items": [item for item in items if item], "prefixes": sorted(prefixes)}

  def do_POST(self) -> None:
    parts, query = self._parse()
    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
    if parts[3:] == ["compose"]:
      sources = [self._object(parts[0], source["name"]) for source in json.loads(body)["sourceObjects"]]
      if any(metadata is None for _, metadata in sources):
        self.reply(404)
        return
      data = b""
      for path, _ in sources:
        with open(path, "rb") as f:
          data += f.read()
      if self._write(parts[0], parts[2], data, None):
        self.gcs.composed.append(f"{parts[0]}/{parts[2]}")
    elif parts[3:4] in (["rewriteTo"], ["moveTo"]):  # a copy (done in one call), or a move (atomic)
      path, metadata = self._object(parts[0], parts[2])
      if metadata is None:
        self.reply(404)
        return
      moves = parts[3] == "moveTo"
      if moves and self._refused("storage.objects.delete", parts[0], parts[2]):
        return
      with open(path, "rb") as f:
        written = self._write(parts[4], parts[5], f.read(), None, rewrite=not moves)
      if moves and written:
        os.remove(path)
    elif len(parts) == 2 and query.get("uploadType") == ["media"]:
      self._write(parts[0], query["name"][0], body, query.get("ifGenerationMatch", [None])[0])
    elif len(parts) == 2 and query.get("uploadType") == ["multipart"]:
      metadata, data = self._multipart(body)
      self._write(parts[0], metadata["name"], data, query.get("ifGenerationMatch", [None])[0])
    elif len(parts) == 2 and query.get("uploadType") == ["resumable"]:
      self._resumable(parts[0], query, body)
    else:
      self.reply(501)

  do_PUT = do_POST  # a resumable upload's chunks (GCS documents PUT; gcsfs sends POST)

  def _resumable(self, bucket: str, query: dict[str, list[str]], body: bytes) -> None:
    """Starts an upload session (its URL in the Location header), or takes its next chunk ("Content-Range: bytes
    A-B/TOTAL", TOTAL "*" until the last chunk); the object is written once TOTAL bytes have come."""
    if "upload_id" not in query:
      upload_id = uuid.uuid4().hex
      self.gcs.uploads[upload_id] = (bucket, json.loads(body)["name"], query.get("ifGenerationMatch", [None])[0],
                                     bytearray())
      location = f"{self.gcs.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
      self.reply(200, b"", {"Location": location})
      return
    bucket, name, generation_match, received = self.gcs.uploads[query["upload_id"][0]]
    received += body
    total = self.headers.get("Content-Range", "*/*").rsplit("/", 1)[1]
    if total != "*" and int(total) == len(received):
      del self.gcs.uploads[query["upload_id"][0]]
      self._write(bucket, name, bytes(received), generation_match)
    else:
      self.reply(308, b"", {"Range": f"bytes=0-{len(received) - 1}"})

  def _multipart(self, body: bytes) -> tuple[dict, bytes]:
    """(the metadata, the bytes) of a multipart/related upload: two parts, each headers, a blank line, content."""
    marker = b"--" + self.headers["Content-Type"].split("boundary=")[1].strip('"').encode()
    first = body.index(marker) + len(marker)
    second = body.index(marker, first)
    metadata, data = (_content(part) for part in (body[first:second],
                                                     body[second + len(marker):body.rindex(marker + b"--")]))
    return json.loads(metadata), data

  def _precondition_failed(self, generation_match: str | None, metadata: dict | None) -> bool:
    """Answers 412 and says so when the request's ifGenerationMatch is not the object's generation ("0": none)."""
    if generation_match is None or generation_match == (metadata["generation"] if metadata else "0"):
      return False
    self.reply(412)
    return True

  def _write(self, bucket: str, name: str, data: bytes, generation_match: str | None, rewrite: bool = False) -> bool:
    """Writes the object and answers with its metadata (for a copy, `rewrite`: in a finished rewrite's answer), or
    answers why not; says whether it wrote."""
    with self.gcs.writing:
      path, metadata = self._object(bucket, name)
      if (self._refused("storage.objects.create", bucket, name)
          or (metadata and self._refused("storage.objects.delete", bucket, name))):
        return False
      if self._precondition_failed(generation_match, metadata):
        return False
      os.makedirs(os.path.dirname(path), exist_ok=True)
      partial = os.path.join(self.root, f".upload-{uuid.uuid4().hex}")  # outside every bucket: never listed
      with open(partial, "wb") as f:
        f.write(data)
      self.gcs.generation = max(time.time_ns(), self.gcs.generation + 1)
      os.utime(partial, ns=(self.gcs.generation, self.gcs.generation))
      os.replace(partial, path)  # GCS shows an object whole or not at all
      metadata = self._object(bucket, name)[1]
    self.reply(200, {"kind": "storage#rewriteResponse", "done": True, "resource": metadata} if rewrite else metadata)
    return True

  def do_DELETE(self) -> None:
    parts, query = self._parse()
    path, metadata = self._object(parts[0], parts[2]) if len(parts) == 3 else ("", None)
    if metadata is None:
      self.reply(404)
      return
    if self._refused("storage.objects.delete", parts[0], parts[2]):
      return
    if self._precondition_failed(query.get("ifGenerationMatch", [None])[0], metadata):
      return
    os.remove(path)
    self.reply(204)

def _content(part: bytes) -> bytes:
  """A multipart part's content: after its headers' blank line, before the line break that ends it."""
  for blank, end in ((b"\r\n\r\n", b"\r\n"), (b"\n\n", b"\n")):
    if blank in part:
      return part.split(blank, 1)[1].removesuffix(end)
  raise ValueError("a multipart part without headers")


@contextlib.contextmanager
def serve(root: str) -> Iterator[Server]:
  """The stand-in's HTTP server over ROOT while inside."""
  server = Server("", [], [])
  with stand_in.serving(_JsonApi, root=root, gcs=server) as server.url:
    yield server


def subprocess_env(url: str, devices: int = 1) -> dict[str, str]:
  """The environment of a test subprocess whose gs:// is `serve`'s server at `url`: `cpu_env(devices)`, the endpoint
  of each client (gcsfs and google-cloud-storage read STORAGE_EMULATOR_HOST, tensorstore TENSORSTORE_GCS_HTTP_URL),
  gcsfs without credentials (fsspec's FSSPEC_<PROTOCOL>_<ARGUMENT> variables), and tests/ on the path."""
  env = cpu_env(devices, TENSORSTORE_GCS_HTTP_URL=url, STORAGE_EMULATOR_HOST=url, FSSPEC_GS_TOKEN="anon",
                FSSPEC_GCS_TOKEN="anon", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
  env.pop(storage.GCS_CLIENT_SWITCH, None)  # set in this shell, it would hand gs:// to gcsfs's gRPC-probing class
  return env


def register(url: str) -> None:
  """fsspec's `gs` and `gcs` protocols reach `serve`'s server at `url` without credentials, in this process, through
  gcsfs's JSON-API class (the one `storage.choose_gcs_client` chooses). `unregister` puts that class back."""

  class StandIn(GCSFileSystem):  # a class per server: fsspec keeps one instance per class and arguments
    protocol = ("gs", "gcs")

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **{**kwargs, "endpoint_url": url, "token": "anon"})

  for protocol in StandIn.protocol:
    fsspec.register_implementation(protocol, StandIn, clobber=True)


def unregister() -> None:
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)


def registered(root: str) -> contextlib.AbstractContextManager[Server]:
  """`serve(root)` and `register` its URL while inside, then `unregister`."""
  return stand_in.registered(serve, register, unregister, root)
