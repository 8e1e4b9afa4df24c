"""The Hugging Face Hub stood in for by a local directory (dataset ORG/NAME = ROOT/ORG/NAME), so that tests read
hf://datasets/... shards with no network, through the real client: `serve` answers over HTTP what huggingface_hub's
HfFileSystem (fsspec's hf://) asks of the Hub, and records each request with the token it carried; `register` points
HfFileSystem at it (a subprocess instead sets HF_ENDPOINT to its URL).

ROOT/ORG/NAME holds the files of the dataset's main branch at its newest commit (REVISION until `commit` makes
another). `commit` changes them as a commit to the Hub does, keeping the files of the commit before under
ROOT/.commits/ORG/NAME/SHA, where they stay readable at that sha; `tag` names a commit, as a tag or branch does."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import pathlib
import re
import shutil
import time
import urllib.parse
from collections.abc import Iterator

import fsspec
import stand_in
from huggingface_hub import HfFileSystem

REVISION = "0123456789abcdef0123456789abcdef01234567"  # every dataset's first commit
# ROOT/.commits/ORG/NAME/refs/REF holds the commit of branch or tag REF (main included, once `commit` moved it), and
# ROOT/.commits/ORG/NAME/SHA/ the files of an earlier commit.
_COMMITS = ".commits"
_SHA = re.compile(r"[0-9a-f]{40}")


@dataclasses.dataclass
class Server:
  url: str  # for `register` and HF_ENDPOINT
  requests: list[tuple[str, str | None]]  # (the path asked for, its Authorization header)
  denied: set[str] = dataclasses.field(default_factory=set)  # files answered 401, as ORG/NAME/PATH
  unavailable: int = 0  # how many of the next /api/datasets requests to answer 503 (a brief outage of the Hub)
  # Until this time.monotonic(), file requests are answered 429 with the Hub's RateLimit header (its window's reset).
  rate_limited_until: float = 0.0


class _HubApi(stand_in.Handler):
  """What HfFileSystem asks of the Hub, over ROOT, where REV is a branch, a tag or a commit sha (404 with the Hub's
  RevisionNotFound for any other):
  GET /api/datasets/ORG/NAME[/revision/REV]: the dataset's id and the commit of REV (main when none);
  GET /api/datasets/ORG/NAME/tree/REV[/PATH][?recursive=True]: the files and folders under PATH;
  (each answered 503 while the server's `unavailable` count lasts);
  GET /datasets/ORG/NAME/resolve/REV/PATH: the file's bytes, a Range of them if asked (401 for `denied` files; 429
    with the seconds to the window's reset in its RateLimit header while `rate_limited_until` lasts);
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
    elif parts[:2] == ["api", "datasets"] and len(parts) == 3:  # huggingface_hub's try of a name without its ORG/
      self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
    elif parts[:2] == ["api", "datasets"] and len(parts) >= 4:
      repo, rest = "/".join(parts[2:4]), parts[4:]
      if self.hub.unavailable > 0:
        self.hub.unavailable -= 1
        self.reply(503, {"error": "Service Unavailable"})
      elif not os.path.isdir(os.path.join(self.root, repo)):
        self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
      elif rest == [] or (rest[:1] == ["revision"] and len(rest) == 2):
        if at := self._at(repo, rest[1] if rest else "main"):
          self.reply(200, {"id": repo, "sha": at[0], "private": False})
      elif rest[:1] == ["tree"] and len(rest) >= 2:
        if at := self._at(repo, rest[1]):
          self.reply(200, self._tree(at[1], "/".join(rest[2:]), query.get("recursive") == ["True"]))
      else:
        self.reply(404, {"error": "Not found"})
    elif parts[:1] == ["datasets"] and parts[3:4] == ["resolve"] and len(parts) >= 6:
      repo, name = "/".join(parts[1:3]), "/".join(parts[5:])
      if (left := self.hub.rate_limited_until - time.monotonic()) > 0:
        self.reply(429, {"error": "Too Many Requests"}, {"RateLimit": f'"resolvers";r=0;t={math.ceil(left)}'})
      elif f"{repo}/{name}" in self.hub.denied:
        self.reply(401, {"error": "Invalid credentials"})
      elif at := self._at(repo, parts[4]):
        path = os.path.join(at[1], name)
        if os.path.isfile(path):
          self.send_file(path)
        else:
          self.reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
    else:
      self.reply(404, {"error": "Not found"})

  def do_POST(self) -> None:
    url = urllib.parse.urlparse(self.path)
    self.hub.requests.append((url.path, self.headers.get("Authorization")))
    parts = [urllib.parse.unquote(part) for part in url.path.strip("/").split("/")]
    form = urllib.parse.parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
    repo = "/".join(parts[2:4])
    if parts[:2] != ["api", "datasets"] or parts[4:5] != ["paths-info"] or len(parts) != 6:
      self.reply(404, {"error": "Not found"})
    elif not os.path.isdir(os.path.join(self.root, repo)):
      self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
    elif at := self._at(repo, parts[5]):
      base = at[1]
      self.reply(200, [self._entry(base, os.path.join(base, path)) for path in form.get("paths", [])
                       if os.path.exists(os.path.join(base, path))])

  def _at(self, repo: str, revision: str) -> tuple[str, str] | None:
    """(commit, the directory of its files) of `revision` of `repo`; None, answered with the Hub's 404, when the
    repository has no such branch, tag or commit."""
    at = _files_at(self.root, repo, revision)
    if at is None:
      self.reply(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
    return at

  @staticmethod
  def _entry(base: str, path: str) -> dict:
    relative = os.path.relpath(path, base).replace(os.sep, "/")
    oid = hashlib.sha1(relative.encode()).hexdigest()
    return ({"type": "directory", "oid": oid, "path": relative} if os.path.isdir(path) else
            {"type": "file", "oid": oid, "size": os.path.getsize(path), "path": relative})

  def _tree(self, base: str, folder: str, recursive: bool) -> list[dict]:
    entries = []
    for here, folders, files in os.walk(os.path.join(base, folder)):
      entries += [self._entry(base, os.path.join(here, name)) for name in sorted(folders) + sorted(files)]
      if not recursive:
        break
    return entries


def _ref(root: str, repo: str, name: str) -> str | None:
  path = os.path.join(root, _COMMITS, repo, "refs", name)
  return pathlib.Path(path).read_text() if os.path.isfile(path) else None


def _set_ref(root: str, repo: str, name: str, sha: str) -> None:
  path = os.path.join(root, _COMMITS, repo, "refs", name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pathlib.Path(path).write_text(sha)


def head(root: str, repo: str) -> str:
  """The commit of main of dataset REPO (ORG/NAME) of the stand-in over ROOT."""
  return _ref(root, repo, "main") or REVISION


def _files_at(root: str, repo: str, revision: str) -> tuple[str, str] | None:
  """(commit, the directory of its files) of `revision` (a branch, a tag or a commit sha) of dataset REPO of the
  stand-in over ROOT, or None when it has no such revision."""
  sha = head(root, repo) if revision == "main" else _ref(root, repo, revision) or revision
  if sha == head(root, repo):
    return sha, os.path.join(root, repo)
  earlier = os.path.join(root, _COMMITS, repo, sha)
  return (sha, earlier) if _SHA.fullmatch(sha) and os.path.isdir(earlier) else None


def commit(root: str, repo: str, files: dict[str, bytes | None]) -> str:
  """A commit to main of dataset REPO (ORG/NAME) of the stand-in over ROOT, as `hf upload` or a deletion on the Hub
  makes: `files` maps paths in the repository to their new bytes, or to None to delete them. Returns the new
  commit's sha; the commit before stays readable at its own sha (its files are kept), as on the Hub."""
  base, before = os.path.join(root, repo), head(root, repo)
  shutil.copytree(base, os.path.join(root, _COMMITS, repo, before))
  changes = []
  for path, data in sorted(files.items()):
    target = os.path.join(base, path)
    if data is None:
      os.remove(target)
    else:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      pathlib.Path(target).write_bytes(data)
    changes.append(f"{path} {'deleted' if data is None else hashlib.sha1(data).hexdigest()}")
  after = hashlib.sha1("\n".join([before, *changes]).encode()).hexdigest()
  _set_ref(root, repo, "main", after)
  return after


def tag(root: str, repo: str, name: str, sha: str | None = None) -> None:
  """Tag (or branch) NAME of dataset REPO of the stand-in over ROOT, at commit `sha` (None: main's newest)."""
  _set_ref(root, repo, name, sha or head(root, repo))


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
