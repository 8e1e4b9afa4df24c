"""What the HTTP stand-ins for remote services (tests/fake_gcs.py, tests/fake_hub.py) share: a quiet local server,
replies with JSON or bytes, files sent whole or as a Range, and the serve-and-register pattern of their tests."""

from __future__ import annotations

import contextlib
import http.server
import json
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Handler(http.server.BaseHTTPRequestHandler):
  """A request handler that logs nothing and answers with `reply` or `send_file`."""

  def log_message(self, *args) -> None:
    pass

  def reply(self, status: int, body: bytes | dict | list | None = None, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(body).encode() if isinstance(body, (dict, list)) else body or b""
    self.send_response(status)
    for name, value in (headers or {}).items():
      self.send_header(name, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def send_file(self, path: str, headers: dict[str, str] | None = None) -> None:
    """The file's bytes, or the part a Range header asks for ("bytes=A-B", "bytes=A-", "bytes=-N")."""
    with open(path, "rb") as f:
      data = f.read()
    headers = dict(headers or {})
    ranged = self.headers.get("Range")
    if not ranged:
      self.reply(200, data, headers)
      return
    first, last = ranged.removeprefix("bytes=").split("-")
    if not first:  # the last `last` bytes
      first, last = str(max(len(data) - int(last), 0)), ""
    first, last = int(first), min(int(last or len(data) - 1), len(data) - 1)
    headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
    self.reply(206, data[first:last + 1], headers)


class _Quiet(http.server.ThreadingHTTPServer):
  def handle_error(self, request, client_address) -> None:
    if not isinstance(sys.exc_info()[1], ConnectionError):  # a client gone (a process that exited) is no error
      super().handle_error(request, client_address)


@contextlib.contextmanager
def serving(handler: type[Handler], **attributes: Any) -> Iterator[str]:
  """A local HTTP server answering with a subclass of `handler` that has `attributes`, while inside; yields its
  URL."""
  server = _Quiet(("127.0.0.1", 0), type("Handler", (handler,), attributes))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def registered(serve: Callable[[str], contextlib.AbstractContextManager], register: Callable[[str], None],
               unregister: Callable[[], None], root: str) -> Iterator[Any]:
  """`serve(root)`, and `register` its URL in this process while inside (yielding what `serve` yields, which has
  the URL as `.url`), then `unregister`."""
  with serve(root) as server:
    register(server.url)
    try:
      yield server
    finally:
      unregister()
