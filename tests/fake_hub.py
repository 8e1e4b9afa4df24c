"""The Hugging Face Hub stood in for by a local directory (dataset ORG/NAME = ROOT/ORG/NAME), so that tests read
hf://datasets/... shards with no network, through the real client: `serve` answers over HTTP what huggingface_hub's
HfFileSystem (fsspec's hf://) asks of the Hub, and records each request with the token it carried; `register` points
HfFileSystem at it (a subprocess instead sets HF_ENDPOINT to its URL)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import urllib.parse
from collections.abc import Iterator

import fsspec
import stand_in
from huggingface_hub import HfFileSystem

REVISION = "0123456789abcdef0123456789abcdef01234567"  # every dataset's one commit


@dataclasses.dataclass
class Server:
  url: str  # for `register` and HF_ENDPOINT
  requests: list[tuple[str, str | None]]  # (the path asked for, its Authorization header)
  denied: set[str] = dataclasses.field(default_factory=set)  # files answered 401, as ORG/NAME/PATH
  unavailable: int = 0  # how many of the next /api/datasets requests to answer 503 (a brief outage of the Hub)


class _HubApi(stand_in.Handler):
  """What HfFileSystem asks of the Hub, over ROOT:
  GET /api/datasets/ORG/NAME[/revision/REV]: the dataset's id and commit;
  GET /api/datasets/ORG/NAME/tree/REV[/PATH][?recursive=True]: the files and folders under PATH;
  (each answered 503 while the server's `unavailable` count lasts);
  GET /datasets/ORG/NAME/resolve/REV/PATH: the file's bytes, a Range of them if asked (401 for `denied` files);
  GET /api/whoami-v2: the account of any token (`hf auth login` asks it), 401 without one;
  POST /api/datasets/ORG/NAME/paths-info/REV (form: paths=...): the entries of those paths that exist."""

  root: str
  hub: Server

  def do_GET(self) -> None:
    url = urllib.parse.urlparse(self.path)
    self.hub.requests.append((url.path, self.headers.get("Authorization")))
    parts = [urllib.parse.unquote(part) for part in url.path.strip("/").split("/")]
    query = urllib.parse.parse_qs(url.query)
    if parts == ["api", "whoami-v2"]:
      if self.headers.get("Authorization"):
        self.reply(200, {"type": "user", "name": "echo-tester",
                         "auth": {"type": "access_token", "accessToken": {"displayName": "worker", "role": "read"}}})
      else:
        self.reply(401, {"error": "Invalid credentials in Authorization header"})
    elif parts[:2] == ["api", "datasets"] and len(parts) >= 4:
      repo, rest = "/".join(parts[2:4]), parts[4:]
      if self.hub.unavailable > 0:
        self.hub.unavailable -= 1
        self.reply(503, {"error": "Service Unavailable"})
      elif not os.path.isdir(os.path.join(self.root, repo)):
        self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
      elif rest in ([], ["revision", "main"], ["revision", REVISION]):
        self.reply(200, {"id": repo, "sha": REVISION, "private": False})
      elif rest[:1] == ["tree"]:
        self.reply(200, self._tree(repo, "/".join(rest[2:]), query.get("recursive") == ["True"]))
      else:
        self.reply(404, {"error": "Not found"})
    elif parts[:1] == ["datasets"] and parts[3:4] == ["resolve"]:
      repo, name = "/".join(parts[1:3]), "/".join(parts[5:])
      path = os.path.join(self.root, repo, name)
      if f"{repo}/{name}" in self.hub.denied:
        self.reply(401, {"error": "Invalid credentials"})
      elif not os.path.isfile(path):
        self.reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
      else:
        self.send_file(path)
    else:
      self.reply(404, {"error": "Not found"})

  def do_POST(self) -> None:
    url = urllib.parse.urlparse(self.path)
    self.hub.requests.append((url.path, self.headers.get("Authorization")))
    parts = [urllib.parse.unquote(part) for part in url.path.strip("/").split("/")]
    form = urllib.parse.parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
    repo = "/".join(parts[2:4])
    if parts[:2] != ["api", "datasets"] or parts[4:5] != ["paths-info"]:
      self.reply(404, {"error": "Not found"})
    elif not os.path.isdir(os.path.join(self.root, repo)):
      self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
    else:
      base = os.path.join(self.root, repo)
      self.reply(200, [self._entry(base, os.path.join(base, path)) for path in form.get("paths", [])
                       if os.path.exists(os.path.join(base, path))])

  @staticmethod
  def _entry(base: str, path: str) -> dict:
    relative = os.path.relpath(path, base).replace(os.sep, "/")
    oid = hashlib.sha1(relative.encode()).hexdigest()
    return ({"type": "directory", "oid": oid, "path": relative} if os.path.isdir(path) else
            {"type": "file", "oid": oid, "size": os.path.getsize(path), "path": relative})

  def _tree(self, repo: str, folder: str, recursive: bool) -> list[dict]:
    base = os.path.join(self.root, repo)
    entries = []
    for here, folders, files in os.walk(os.path.join(base, folder)):
      entries += [self._entry(base, os.path.join(here, name)) for name in sorted(folders) + sorted(files)]
      if not recursive:
        break
    return entries

@contextlib.contextmanager
def serve(root: str) -> Iterator[Server]:
  """The stand-in's HTTP server over ROOT while inside."""
  server = Server("", [])
  with stand_in.serving(_HubApi, root=root, hub=server) as server.url:
    yield server


def register(url: str) -> None:
  """fsspec's `hf` protocol is HfFileSystem reaching `serve`'s server at `url` in this process; `unregister` restores
  the default."""

  class StandIn(HfFileSystem):  # a class per server: fsspec keeps one instance per class and arguments
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **{**kwargs, "endpoint": url})

  fsspec.register_implementation("hf", StandIn, clobber=True)


def unregister() -> None:
  fsspec.register_implementation("hf", HfFileSystem, clobber=True)


def registered(root: str) -> contextlib.AbstractContextManager[Server]:
  """`serve(root)` and `register` its URL while inside, then `unregister`."""
  return stand_in.registered(serve, register, unregister, root)
