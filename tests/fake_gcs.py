"""Google Cloud Storage stood in for by a local directory (bucket NAME = ROOT/NAME), so that tests read and write
gs:// URLs with no network. Orbax writes and reads arrays through tensorstore and asks a bucket's settings through
google-cloud-storage: both are pointed (TENSORSTORE_GCS_HTTP_URL, STORAGE_EMULATOR_HOST) at `serve`'s HTTP server,
which answers what they ask of GCS's JSON API. Orbax lists directories and writes and reads small files through etils'
epath, whose gs:// is fsspec's `gcs` protocol, which `register` maps onto ROOT, as the run directory's own files are
written."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
import urllib.parse
from collections.abc import Iterator

import fsspec
import gcsfs
from conftest import REPO, cpu_env
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class _JsonApi(http.server.BaseHTTPRequestHandler):
  """What tensorstore and google-cloud-storage ask of GCS's JSON API, over ROOT:
  GET /storage/v1/b/B: the bucket's metadata; GET /storage/v1/b/B/o?prefix=P: the objects under P;
  GET /storage/v1/b/B/o/O: the object's metadata, or (alt=media) its bytes, a Range of them if asked;
  POST /upload/storage/v1/b/B/o?uploadType=media&name=O[&ifGenerationMatch=G]: write O (412 when G is not its
  generation; 0: it must not exist yet); DELETE /storage/v1/b/B/o/O. An object's generation is its file's mtime."""

  root: str
  served: list[str]  # the objects whose bytes were read

  def log_message(self, *args) -> None:
    pass

  def _object(self, bucket: str, name: str) -> tuple[str, dict[str, str] | None]:
    """(the object's file, its metadata or None when there is no such object)."""
    path = os.path.join(self.root, bucket, name)
    if not os.path.isfile(path):
      return path, None
    return path, {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(os.path.getsize(path)),
                  "generation": str(os.stat(path).st_mtime_ns), "metageneration": "1"}

  def do_GET(self) -> None:
    url = urllib.parse.urlparse(self.path)
    query = urllib.parse.parse_qs(url.query)
    parts = url.path.split("/", 6)  # ['', 'storage', 'v1', 'b', BUCKET, 'o', OBJECT]
    if parts[1:4] != ["storage", "v1", "b"] or not os.path.isdir(os.path.join(self.root, parts[4])):
      self._reply(404)
      return
    bucket = parts[4]
    if len(parts) == 5:
      self._reply(200, {"kind": "storage#bucket", "name": bucket, "id": bucket})
      return
    if len(parts) == 6:
      prefix, base = query.get("prefix", [""])[0], os.path.join(self.root, bucket)
      names = sorted(os.path.relpath(os.path.join(folder, name), base)
                     for folder, _, files in os.walk(base) for name in files)
      self._reply(200, {"kind": "storage#objects",
                        "items": [self._object(bucket, name)[1] for name in names if name.startswith(prefix)]})
      return
    path, metadata = self._object(bucket, urllib.parse.unquote(parts[6]))
    if metadata is None:
      self._reply(404)
    elif query.get("alt") != ["media"]:
      self._reply(200, metadata)
    else:
      self.served.append(os.path.relpath(path, self.root))
      self._read(path, metadata["generation"])

  def _read(self, path: str, generation: str) -> None:
    with open(path, "rb") as f:
      data = f.read()
    headers = {"x-goog-generation": generation}
    ranged = self.headers.get("Range")
    if not ranged:
      self._reply(200, data, headers)
      return
    first, last = ranged.removeprefix("bytes=").split("-")
    first, last = int(first), min(int(last or len(data) - 1), len(data) - 1)
    headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
    self._reply(206, data[first:last + 1], headers)

  def do_POST(self) -> None:
    url = urllib.parse.urlparse(self.path)
    query = urllib.parse.parse_qs(url.query)
    data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
    parts = url.path.split("/")  # ['', 'upload', 'storage', 'v1', 'b', BUCKET, 'o']
    if parts[1:5] != ["upload", "storage", "v1", "b"] or query.get("uploadType") != ["media"]:
      self._reply(501)
      return
    bucket, name = parts[5], query["name"][0]
    path, metadata = self._object(bucket, name)
    wanted = query.get("ifGenerationMatch", [None])[0]
    if wanted is not None and wanted != (metadata["generation"] if metadata else "0"):
      self._reply(412)
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
    self._reply(200, self._object(bucket, name)[1])

  def do_DELETE(self) -> None:
    parts = urllib.parse.urlparse(self.path).path.split("/", 6)
    path, metadata = self._object(parts[4], urllib.parse.unquote(parts[6]))
    if metadata is None:
      self._reply(404)
      return
    os.remove(path)
    self._reply(204)

  def _reply(self, status: int, body: bytes | dict | None = None, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(body).encode() if isinstance(body, dict) else body or b""
    self.send_response(status)
    for name, value in (headers or {}).items():
      self.send_header(name, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)


@contextlib.contextmanager
def serve(root: str) -> Iterator[tuple[str, list[str]]]:
  """(the server's URL for TENSORSTORE_GCS_HTTP_URL and STORAGE_EMULATOR_HOST, the objects it has served so far)
  while inside."""
  served: list[str] = []
  handler = type("Handler", (_JsonApi,), {"root": root, "served": served})
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}", served
  finally:
    server.shutdown()
    server.server_close()


def subprocess_env(url: str, devices: int = 1) -> dict[str, str]:
  """The environment of a test subprocess that reaches `serve`'s server at `url` as GCS (it calls `register` first,
  with the same ROOT): `cpu_env(devices)`, the two endpoints, and tests/ on the path for this module."""
  return cpu_env(devices, TENSORSTORE_GCS_HTTP_URL=url, STORAGE_EMULATOR_HOST=url,
                 PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))


def register(root: str) -> list[str]:
  """fsspec's `gs` and `gcs` protocols (gcsfs's) read and write ROOT in this process, with GCS's compose (`merge`);
  returns the list of objects composed onto (the destination of each `merge`) from now on. `unregister` gives the
  protocols back to gcsfs."""
  composed: list[str] = []

  class LocalBuckets(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, **kwargs):  # gcsfs's options (etils passes finalize_on_close) mean nothing here
      super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))  # GCS has no directories to make

    @classmethod
    def _strip_protocol(cls, path):
      return str(path).removeprefix("gs://").removeprefix("gcs://")

    def merge(self, path, paths, acl=None):  # GCS's compose, as gcsfs calls it: the sources' bytes, in order
      composed.append(path)
      self.pipe_file(path, b"".join(self.cat_file(source) for source in paths))

  for protocol in LocalBuckets.protocol:
    fsspec.register_implementation(protocol, LocalBuckets, clobber=True)
  return composed


def unregister() -> None:
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs.GCSFileSystem, clobber=True)


@contextlib.contextmanager
def registered(root: str) -> Iterator[list[str]]:
  """`register(root)` while inside (yielding its list of composed objects), then `unregister`."""
  composed = register(root)
  try:
    yield composed
  finally:
    unregister()
