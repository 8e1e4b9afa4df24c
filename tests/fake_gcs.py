"""Google Cloud Storage stood in for by a local directory (bucket NAME = ROOT/NAME), so that tests read gs:// URLs
with no network. Orbax reads arrays through tensorstore, and asks a bucket's settings through google-cloud-storage:
both are pointed (TENSORSTORE_GCS_HTTP_URL, STORAGE_EMULATOR_HOST) at `serve`'s HTTP server, which answers the GCS JSON
API's object and bucket reads. It lists directories and reads small files through etils' epath, whose gs:// is
fsspec's `gcs` protocol, which `register` maps onto ROOT (for reads and writes: the run directory's files are
written through fsspec). The HTTP server answers reads only."""

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
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class _ObjectReads(http.server.BaseHTTPRequestHandler):
  """GET /storage/v1/b/BUCKET: the bucket's metadata; GET /storage/v1/b/BUCKET/o/OBJECT: the object's metadata, or
  (alt=media) its bytes, a Range of them if asked."""

  root: str
  served: list[str]

  def log_message(self, *args) -> None:
    pass

  def do_GET(self) -> None:
    url = urllib.parse.urlparse(self.path)
    parts = url.path.split("/", 6)  # ['', 'storage', 'v1', 'b', BUCKET, 'o', OBJECT]
    if parts[1:4] != ["storage", "v1", "b"]:
      self._reply(404, b"")
      return
    if len(parts) == 5 and os.path.isdir(os.path.join(self.root, parts[4])):  # the bucket's metadata
      self._reply(200, json.dumps({"kind": "storage#bucket", "name": parts[4], "id": parts[4]}).encode())
      return
    path = os.path.join(self.root, parts[4], urllib.parse.unquote(parts[6])) if len(parts) == 7 else ""
    if not os.path.isfile(path):
      self._reply(404, b"")
      return
    self.served.append(os.path.relpath(path, self.root))
    with open(path, "rb") as f:
      data = f.read()
    generation = str(os.stat(path).st_mtime_ns)
    if urllib.parse.parse_qs(url.query).get("alt") != ["media"]:
      self._reply(200, json.dumps({"bucket": parts[4], "name": urllib.parse.unquote(parts[6]),
                                   "size": str(len(data)), "generation": generation}).encode())
      return
    headers = {"x-goog-generation": generation}
    ranged = self.headers.get("Range")
    if not ranged:
      self._reply(200, data, headers)
      return
    first, last = ranged.removeprefix("bytes=").split("-")
    first, last = int(first), min(int(last or len(data) - 1), len(data) - 1)
    headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
    self._reply(206, data[first:last + 1], headers)

  def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
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
  handler = type("Handler", (_ObjectReads,), {"root": root, "served": served})
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}", served
  finally:
    server.shutdown()
    server.server_close()


def register(root: str) -> None:
  """fsspec's `gs` and `gcs` protocols (gcsfs's) read and write ROOT in this process, with GCS's compose (`merge`);
  `unregister` gives them back to gcsfs."""

  class LocalBuckets(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, **kwargs):  # gcsfs's options (etils passes finalize_on_close) mean nothing here
      super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))  # GCS has no directories to make

    @classmethod
    def _strip_protocol(cls, path):
      return str(path).removeprefix("gs://").removeprefix("gcs://")

    def merge(self, path, paths, acl=None):  # GCS's compose, as gcsfs calls it: the sources' bytes, in order
      data = b"".join(self.cat_file(source) for source in paths)
      self.pipe_file(path, data)

  for protocol in LocalBuckets.protocol:
    fsspec.register_implementation(protocol, LocalBuckets, clobber=True)


def unregister() -> None:
  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, gcsfs.GCSFileSystem, clobber=True)
