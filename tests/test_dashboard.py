"""Tests of the dashboard server (echo_jax/dashboard.py): API, incremental reads, downsampling, safety."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import fsspec
import fsspec.implementations.memory
import numpy as np
import pytest
from conftest import REPO
from prometheus_client.parser import text_string_to_metric_families

from echo_jax import dashboard, metrics

SCRIPT = "<script>alert(1)</script>"


def _metric_line(step: int, t0: float = 1.7e9) -> str:
  return json.dumps({"step": step, "time": t0 + step, "loss": 1.0 / (1 + step), "lr": 1e-4, "grad_norm": 1.5,
                     "samples_seen": step * 8, "total_steps": 1000, "data_wait": 0.1, "step_time": 0.5})


def make_run(root, name: str = "run", steps: int = 10) -> str:
  """A small run directory with metrics, events, one checkpoint and one sample whose text is markup."""
  run = root / name
  (run / "checkpoints" / "5").mkdir(parents=True)
  sample_dir = run / "samples" / "step_5"
  sample_dir.mkdir(parents=True)
  (sample_dir / "s0.txt").write_text(SCRIPT)
  (sample_dir / "s0.wav").write_bytes(b"RIFF0000WAVE")
  (sample_dir / "s0.png").write_bytes(b"\x89PNG\r\n\x1a\n")
  (run / "config.json").write_text("{}")
  (run / "metrics.jsonl").write_text("".join(_metric_line(i) + "\n" for i in range(steps)))
  events = [
      {"time": 1.7e9, "event": "start", "step": 0},
      {"time": 1.7e9 + 2, "event": "skipped_sample", "step": 2, "reason": SCRIPT, "key": "k", "count": 2},
      {"time": 1.7e9 + 3, "event": "skipped_sample", "step": 3, "reason": "bad", "key": "k2"},
      {"time": 1.7e9 + 5, "event": "checkpoint_saved", "step": 5},
  ]
  (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
  return str(run)


@pytest.fixture
def server(tmp_path):
  runs = [make_run(tmp_path, "alpha"), make_run(tmp_path, "beta", steps=4)]
  (tmp_path / "secret.txt").write_text("top secret")
  os.symlink(tmp_path / "secret.txt", tmp_path / "alpha" / "samples" / "step_5" / "leak.txt")
  srv = dashboard.make_server(runs, port=0)
  thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  yield srv
  srv.shutdown()
  srv.server_close()


def _get(srv, path: str) -> tuple[int, bytes, dict[str, str]]:
  url = f"http://127.0.0.1:{srv.server_address[1]}{path}"
  try:
    with urllib.request.urlopen(url, timeout=10) as response:
      return response.status, response.read(), dict(response.headers)
  except urllib.error.HTTPError as error:
    return error.code, error.read(), dict(error.headers)


def _raw_get(srv, raw_path: str, host: str = "127.0.0.1") -> int:
  """Sends the request line byte for byte, so no client normalises the path first."""
  address = srv.server_address[0] if srv.server_address[0] != "0.0.0.0" else "127.0.0.1"
  with socket.create_connection((address, srv.server_address[1]), timeout=10) as sock:
    sock.sendall(f"GET {raw_path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
      data += chunk
  return int(data.split(b" ", 2)[1])


def test_default_bind_is_loopback(tmp_path):
  srv = dashboard.make_server([make_run(tmp_path)], port=0)
  try:
    assert srv.server_address[0] == "127.0.0.1"
  finally:
    srv.server_close()


def test_a_request_for_another_host_name_is_refused(server):
  """DNS rebinding: a page of attacker.example whose name resolves to 127.0.0.1 could read the API as its own origin;
  any Host was answered (found by review)."""
  port = server.server_address[1]
  for host in ("attacker.example", f"attacker.example:{port}", "localhost.attacker.example", "127.0.0.1.nip.io", ""):
    assert _raw_get(server, "/api/runs", host) == 403, host
  for host in ("localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}", "[::1]", f"[::1]:{port}",
               "LOCALHOST"):
    assert _raw_get(server, "/api/runs", host) == 200, host


def test_a_request_for_the_bind_address_is_answered(tmp_path, monkeypatch):
  """The address given as --host is the one a browser elsewhere opens; on a wildcard bind, the machine's addresses
  and its own name (http://worker-0:8080 was refused)."""
  monkeypatch.setattr(socket, "gethostname", lambda: "Worker-0")
  monkeypatch.setattr(socket, "getfqdn", lambda name="": name or "worker-0.internal.example")
  for bind, allowed, refused in (("127.0.0.2", "127.0.0.2", "10.1.2.3"), ("0.0.0.0", "10.1.2.3", "evil.example")):
    srv = dashboard.make_server([make_run(tmp_path, bind)], host=bind, port=0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
      assert _raw_get(srv, "/api/runs", f"{allowed}:{srv.server_address[1]}") == 200
      assert _raw_get(srv, "/api/runs", refused) == 403
      own_name = 200 if bind == "0.0.0.0" else 403
      for name in ("worker-0", "worker-0.internal.example:80"):
        assert _raw_get(srv, "/api/runs", name) == own_name, (bind, name)
    finally:
      srv.shutdown()
      srv.server_close()


def test_start_up_message_offers_a_private_tunnel_and_says_cloudflared_is_public(monkeypatch, capsys):
  """It said "From your machine: cloudflared tunnel --url http://localhost:PORT": cloudflared must run beside the
  server, and it publishes the page (found by review)."""
  monkeypatch.setattr(socket, "gethostname", lambda: "worker-0")
  message = dashboard.serve_message("127.0.0.1", 8123)
  assert "ssh -L 8123:localhost:8123 worker-0" in message
  cloudflared = next(line for line in message.splitlines() if "cloudflared" in line)
  assert "this machine" in cloudflared and "anyone" in cloudflared and "From your machine" not in message
  assert "Warning" not in message
  assert "Warning: bound to 0.0.0.0, not loopback" in dashboard.serve_message("0.0.0.0", 8123)
  assert "Warning" not in dashboard.serve_message("::1", 8123)


def test_the_printed_cloudflared_command_sends_a_host_the_server_answers(tmp_path):
  """cloudflared passes on its public host name (abc.trycloudflare.com) as the Host header unless told another, and
  the Host check refuses that: the printed command must name one the server answers."""
  srv = dashboard.make_server([make_run(tmp_path, "run")], port=0)
  port = srv.server_address[1]
  threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
  try:
    command = next(line for line in dashboard.serve_message("127.0.0.1", port).splitlines() if "cloudflared" in line)
    sent = command.split("--http-host-header ", 1)[1].split()[0]
    assert _raw_get(srv, "/api/runs", sent) == 200
    assert _raw_get(srv, "/api/runs", "abc.trycloudflare.com") == 403
  finally:
    srv.shutdown()
    srv.server_close()
  launch = (REPO / "launch.sh").read_text()
  assert launch.count("cloudflared tunnel --url http://localhost:8080 --http-host-header localhost:8080") == 2


def test_missing_run_dir_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="run directory not found"):
    dashboard.make_server([str(tmp_path / "nope")], port=0)


def test_a_run_dir_whose_storage_does_not_answer_is_not_called_missing(monkeypatch):
  """A gs:// run with no network was reported as "run directory not found" (fs.isdir answers False for any error;
  found by review)."""
  def unreachable(self, path, **kwargs):
    raise ConnectionError("Cannot connect to host storage.googleapis.com:443")

  monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "info", unreachable)
  with pytest.raises(dashboard.UnreachableRunError, match=r"cannot read memory://run \(ConnectionError: Cannot "
                                                          r"connect to host .*check the network and the credentials"):
    dashboard.make_server(["memory://run"], port=0)


def test_api_returns_points_and_status(server):
  code, body, headers = _get(server, "/api/metrics?run=0&keys=loss,lr,data_wait,skipped_samples")
  assert code == 200 and headers["Content-Type"] == "application/json"
  series = json.loads(body)["series"]
  assert series["loss"]["step"] == list(range(10))
  np.testing.assert_allclose(series["loss"]["value"], [1.0 / (1 + i) for i in range(10)])
  assert series["loss"]["time"][0] == 1.7e9
  np.testing.assert_allclose(series["data_wait"]["value"], [0.1] * 10)
  # Cumulative skipped count, carried on to the latest logged step.
  assert series["skipped_samples"]["value"] == [2.0, 3.0, 3.0]
  assert series["skipped_samples"]["step"] == [2.0, 3.0, 9.0]
  runs = json.loads(_get(server, "/api/runs")[1])["runs"]
  assert [r["name"] for r in runs] == ["alpha", "beta"]
  alpha = runs[0]
  assert alpha["step"] == 9 and alpha["total_steps"] == 1000 and alpha["samples_seen"] == 72
  assert alpha["last_checkpoint"]["step"] == 5 and alpha["listed_checkpoint_step"] == 5
  assert alpha["skipped_samples"] == 3
  assert alpha["steps_per_sec"] == pytest.approx(1.0)
  assert alpha["eta_seconds"] == pytest.approx(991.0)
  assert alpha["stale"]  # the metrics were "logged" in 2023
  events = json.loads(_get(server, "/api/events?run=0")[1])["events"]
  assert [e["event"] for e in events] == ["start", "skipped_sample", "skipped_sample", "checkpoint_saved"]


def test_unknown_run_and_bad_parameters(server):
  assert _get(server, "/api/metrics?run=7&keys=loss")[0] == 404
  assert _get(server, "/api/metrics?run=x&keys=loss")[0] == 404
  assert _get(server, "/api/metrics?run=0&keys=loss&max_points=abc")[0] == 400
  assert _get(server, "/api/metrics?run=0&keys=loss&max_points=2")[0] == 400


def test_samples_served_and_markup_escaped(server):
  code, body, _ = _get(server, "/api/samples?run=0")
  assert code == 200
  # JSON never carries raw markup characters, so even a sniffing browser could not render it as HTML.
  assert b"<" not in body and b">" not in body
  listing = json.loads(body)
  item = next(i for i in listing["steps"][0]["items"] if i["name"] == "s0")
  assert item["text"] == SCRIPT
  assert item["audio"] == "samples/step_5/s0.wav"
  code, wav, headers = _get(server, "/files/0/samples/step_5/s0.wav")
  assert code == 200 and wav == b"RIFF0000WAVE" and headers["Content-Type"] == "audio/wav"
  code, text, headers = _get(server, "/files/0/samples/step_5/s0.txt")
  assert code == 200 and headers["Content-Type"].startswith("text/plain")
  assert headers["X-Content-Type-Options"] == "nosniff"
  events_body = _get(server, "/api/events?run=0")[1]
  assert b"<script>" not in events_body and json.loads(events_body)["events"][1]["reason"] == SCRIPT


def test_page_escapes_and_has_no_inline_script(server):
  code, html, headers = _get(server, "/")
  assert code == 200 and headers["Content-Type"].startswith("text/html")
  assert "script-src 'self'" in headers["Content-Security-Policy"]
  # Scripts are only loaded from files; no inline code the CSP would have to allow.
  assert re.findall(rb"<script[^>]*>", html) == [b'<script src="/static/vendor/uPlot.iife.min.js">',
                                                 b'<script src="/static/app.js">']
  code, app_js, _ = _get(server, "/static/app.js")
  assert code == 200
  assert b"innerHTML" not in app_js and b"insertAdjacentHTML" not in app_js and b"document.write" not in app_js
  assert b"textContent" in app_js
  # A 404 for a path full of markup answers with plain text, not an HTML page echoing it.
  code, body, headers = _get(server, "/%3Cscript%3Ealert(1)%3C/script%3E")
  assert code == 404 and headers["Content-Type"].startswith("text/plain") and b"script" not in body


@pytest.mark.parametrize("raw_path", [
    "/files/0/../config.json",
    "/files/0/samples/../config.json",
    "/files/0/samples/step_5/../../config.json",
    "/files/0/%2e%2e/config.json",
    "/files/0/samples%2f..%2f..%2fconfig.json",
    "/files/0/samples/%2e%2e%2f%2e%2e%2fconfig.json",
    "/files/0/samples/%252e%252e%252f%252e%252e%252fconfig.json",
    "/files/0/samples/step_5/..%5c..%5cconfig.json",
    "/files/0//etc/passwd",
    "/files/0/%2fetc%2fpasswd",
    "/files/0/samples/step_5/leak.txt",
    "/files/1/../alpha/samples/step_5/s0.txt",
    "/files/-1/samples/step_5/s0.txt",
    "/static/../dashboard.py",
    "/static/%2e%2e/dashboard.py",
    "/static/%2e%2e%2f%2e%2e%2fdashboard.py",
    "/static/vendor/../../dashboard.py",
    "/../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/config.json",
    "/metrics.jsonl",
    "/etc/passwd",
])
def test_path_traversal_is_404(server, raw_path):
  assert _raw_get(server, raw_path) == 404


def test_sample_files_allowed_only_in_samples(server):
  assert _raw_get(server, "/files/0/samples/step_5/s0.png") == 200
  assert _raw_get(server, "/files/0/checkpoints/5") == 404
  assert _raw_get(server, "/files/0/samples/step_5") == 404


def test_sample_listing_shows_no_text_from_outside_the_run(tmp_path):
  """The listing read the text of every `samples/step_N/*.txt`, symlinks to files or step directories outside the run
  included, while `/files/` refused to serve them."""
  run_dir = make_run(tmp_path)
  (tmp_path / "outside").mkdir()
  (tmp_path / "outside" / "secret.txt").write_text("TOP SECRET")
  os.symlink(tmp_path / "outside" / "secret.txt", os.path.join(run_dir, "samples", "step_5", "leak.txt"))
  os.symlink(tmp_path / "outside", os.path.join(run_dir, "samples", "step_20"))
  os.symlink(tmp_path / "nowhere.txt", os.path.join(run_dir, "samples", "step_5", "dangling.txt"))
  run = dashboard.RunState(run_dir, "r")
  run.refresh()
  listed = json.dumps(run.samples)
  assert "TOP SECRET" not in listed and "leak" not in listed and "dangling" not in listed
  assert [entry["step"] for entry in run.samples] == [20, 5]
  assert [item["name"] for item in run.samples[1]["items"]] == ["s0"]  # the sample that lives in the run


def test_an_empty_metrics_line_loses_no_other_line(tmp_path):
  """`{}` once failed the whole chunk it came in, and the read had moved past it: those lines never showed."""
  run_dir = make_run(tmp_path, steps=3)
  with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
    f.write("{}\n" + _metric_line(3) + "\n")
  run = dashboard.RunState(run_dir, "r")
  run.refresh()
  assert run.series(["loss"], 2000)["loss"]["step"].tolist() == [0, 1, 2, 3]


def test_sample_paths_checked_on_remote_filesystems():
  """Off the local disk there is no realpath to check, so the path rules alone must hold."""
  import fsspec

  fs = fsspec.filesystem("memory")
  fs.pipe({
      "/remote_run/config.json": b"{}", "/remote_run/notes.txt": b"no", "/remote_run/checkpoints/1/x.txt": b"no",
      "/remote_run/samples/step_1/a.txt": b"hi", "/remote_run/samples/secret.txt": b"no",
      "/remote_run/samples/step_1/a.json": b"{}",
  })
  run = dashboard.RunState("memory://remote_run", "remote")
  assert run.open_sample("samples/step_1/a.txt") == (b"hi", "text/plain; charset=utf-8")
  for bad in ("config.json", "notes.txt", "checkpoints/1/x.txt", "samples/../config.json",
              "samples/step_1/../../config.json", "samples/./step_1/a.txt", "samples//step_1/a.txt",
              "/remote_run/samples/step_1/a.txt", "samples/step_1/a.json", "samples/step_1/%2e%2e",
              "samples/step_1/a.txt/"):
    assert run.open_sample(bad) is None, bad


def test_prometheus_text_parses(server):
  code, body, headers = _get(server, "/metrics")
  assert code == 200 and headers["Content-Type"].startswith("text/plain")
  families = {f.name: f for f in text_string_to_metric_families(body.decode())}
  loss = {s.labels["run"]: s.value for s in families["echo_loss"].samples}
  assert loss == {"alpha": pytest.approx(0.1), "beta": pytest.approx(0.25)}
  step = {s.labels["run"]: s.value for s in families["echo_step"].samples}
  assert step == {"alpha": 9.0, "beta": 3.0}
  assert {s.labels["run"]: s.value for s in families["echo_last_checkpoint_step"].samples}["alpha"] == 5.0
  # prometheus_client strips the _total suffix from the family name of counters only; this is a gauge.
  assert "echo_skipped_samples_total" in families


def test_incremental_read_appends_and_ignores_partial_line(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text(_metric_line(0) + "\n" + _metric_line(1) + "\n")
  tail = dashboard.JsonlTail(str(path))
  assert [r["step"] for chunk in tail.read_new() for r in chunk] == [0, 1]
  first_offset = tail.offset
  partial = _metric_line(2)
  with open(path, "a") as f:
    f.write(partial[:20])
  assert [r for chunk in tail.read_new() for r in chunk] == []
  assert tail.offset == first_offset
  with open(path, "a") as f:
    f.write(partial[20:] + "\n" + "{not json\n" + _metric_line(3) + "\n")
  assert [r["step"] for chunk in tail.read_new() for r in chunk] == [2, 3]
  assert tail.bad_lines == 1
  path.write_text(_metric_line(9) + "\n")  # rewritten (shorter): read again from the start
  chunks = list(tail.read_new())
  assert tail.reset and [r["step"] for chunk in chunks for r in chunk] == [9]


def test_run_state_picks_up_appended_lines(tmp_path):
  run_dir = make_run(tmp_path, steps=3)
  run = dashboard.RunState(run_dir, "r")
  run.refresh()
  assert run.series(["loss"], 2000)["loss"]["step"].tolist() == [0, 1, 2]
  with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
    f.write(_metric_line(3) + "\n" + json.dumps({"step": 3, "time": 1.7e9 + 3, "eval_loss_t0.5": 0.4}) + "\n")
    f.write(_metric_line(4)[:10])
  run.refresh()
  assert run.series(["loss"], 2000)["loss"]["step"].tolist() == [0, 1, 2, 3]
  eval_series = run.series(["eval_loss_t0.5"], 2000)["eval_loss_t0.5"]
  assert eval_series["step"].tolist() == [3] and eval_series["value"].tolist() == [0.4]


def test_a_resumed_run_replaces_the_steps_it_logged_again(tmp_path):
  """Stopped after step 5 with a checkpoint at 3, the relaunch logs 4 and 5 again: the curves show its values, once
  per step, in step order (each series on its own: an eval line at a step does not replace that step's loss)."""
  run_dir = make_run(tmp_path, steps=6)  # steps 0-5
  with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 3, "time": 1.7e9 + 3.5, "eval_loss": 0.5}) + "\n")
    for step in (4, 5, 6):
      f.write(json.dumps({"step": step, "time": 1.7e9 + 10 + step, "loss": 10.0 + step}) + "\n")
  run = dashboard.RunState(run_dir, "r")
  run.refresh()
  loss = run.series(["loss"], 2000)["loss"]
  assert loss["step"].tolist() == [0, 1, 2, 3, 4, 5, 6]
  assert loss["value"].tolist()[4:] == [14.0, 15.0, 16.0]
  assert run.series(["eval_loss"], 2000)["eval_loss"]["step"].tolist() == [3]


def _prometheus(run: dashboard.RunState, now: float) -> dict[str, float]:
  """The run's /metrics samples by name (echo_run_state by its state label)."""
  board = dashboard.Dashboard([run.url])
  board.runs[0] = run
  run.loaded.set()
  time_now = time.time
  try:
    time.time = lambda: now
    text = board.prometheus_text()
  finally:
    time.time = time_now
  samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
  return {s.labels.get("state", s.name): s.value for s in samples}


def _write_jsonl(path, records) -> None:
  with open(path, "a") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("resume_from", [400, 500])
def test_rate_and_eta_after_a_resume_count_only_the_current_launch(tmp_path, resume_from):
  """Launch 1 logs steps 10-500 at 1 step/s and stops; an hour later the relaunch resumes from a checkpoint and logs
  at 1 step/s to step 600 of 1000. The rate was measured across both launches: 0.0954 steps/s and an ETA of 4195 s,
  for 1.0 and 400 s (found by review). Resumed from 400 the steps go back; from 500 only the `start` event tells."""
  run = tmp_path / "run"
  run.mkdir()
  t0, t1 = 1.7e9, 1.7e9 + 500 + 3600
  _write_jsonl(run / "events.jsonl", [{"time": t0, "event": "start", "step": 0}])
  _write_jsonl(run / "metrics.jsonl", [{"step": s, "time": t0 + s, "total_steps": 1000} for s in range(10, 501, 10)])
  _write_jsonl(run / "events.jsonl", [{"time": t0 + 500, "event": "stopped", "step": 500},
                                      {"time": t1, "event": "start", "step": resume_from}])
  _write_jsonl(run / "metrics.jsonl", [{"step": s, "time": t1 + s - resume_from, "total_steps": 1000}
                                       for s in range(resume_from + 10, 601, 10)])
  state = dashboard.RunState(str(run), "run")
  state.refresh()
  now = t1 + 600 - resume_from + 1
  status = state.status(now)
  assert status["steps_per_sec"] == pytest.approx(1.0) and status["eta_seconds"] == pytest.approx(400.0)
  assert status["state"] == "live" and not status["stale"]
  exported = _prometheus(state, now)
  assert exported["echo_run_steps_per_sec"] == pytest.approx(1.0)
  assert exported["echo_run_eta_seconds"] == pytest.approx(400.0)
  if resume_from == 400:  # the steps going back mark the relaunch even when events.jsonl is not (yet) read
    (run / "events.jsonl").unlink()
    assert dashboard.RunState(str(run), "run").status(now)["steps_per_sec"] is None  # not read yet: nothing to go on
    fresh = dashboard.RunState(str(run), "run")
    fresh.refresh()
    assert fresh.status(now)["steps_per_sec"] == pytest.approx(1.0)


def test_a_run_that_finished_stopped_or_failed_says_so_and_is_not_stale(tmp_path):
  """A finished run showed STALE with `echo_stale 1`; one stopped by SIGTERM or by an error also showed STALE, with
  an ETA frozen at its last value (found by review). Each now has its state, no rate, no ETA and is not stale."""
  now = 1.7e9 + 10_000

  def run_with(name: str, last_step: int, events: list[dict]) -> dashboard.RunState:
    run = tmp_path / name
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [{"step": s, "time": 1.7e9 + s, "total_steps": 100}
                                         for s in range(10, last_step + 1, 10)])
    _write_jsonl(run / "events.jsonl", [{"time": 1.7e9, "event": "start", "step": 0}, *events])
    state = dashboard.RunState(str(run), name)
    state.refresh()
    return state

  cases = {
      "finished": run_with("finished", 100, [{"time": 1.7e9 + 101, "event": "checkpoint_saved", "step": 100}]),
      "stopped": run_with("stopped", 50, [{"time": 1.7e9 + 51, "event": "stopped", "step": 50}]),
      "failed": run_with("failed", 50, [{"time": 1.7e9 + 51, "event": "error", "step": 50, "message": "boom"}]),
      "stale": run_with("stale", 50, []),
  }
  for expected, state in cases.items():
    status = state.status(now)
    assert status["state"] == expected, expected
    assert status["stale"] == (expected == "stale"), expected
    assert (status["eta_seconds"] is None) == (expected != "stale"), expected
    exported = _prometheus(state, now)
    assert exported["echo_stale"] == float(expected == "stale"), expected
    assert ("echo_run_eta_seconds" in exported) == (expected == "stale"), expected
    assert {s: exported[s] for s in dashboard.RUN_STATES} == {s: float(s == expected) for s in dashboard.RUN_STATES}
  # A relaunch that got as far as training is live again.
  _write_jsonl(tmp_path / "stopped" / "events.jsonl", [{"time": now - 20, "event": "start", "step": 50}])
  _write_jsonl(tmp_path / "stopped" / "metrics.jsonl", [{"step": 60, "time": now - 15, "total_steps": 100},
                                                         {"step": 70, "time": now - 5, "total_steps": 100}])
  cases["stopped"].refresh()
  status = cases["stopped"].status(now)
  assert status["state"] == "live" and status["eta_seconds"] == pytest.approx(30.0)


def test_nonfinite_values_are_reported_as_such_not_as_the_last_finite_one(tmp_path):
  """The trainer writes NaN and infinity as "nan", "inf" and "-inf". The dashboard took them for missing values:
  the status and /metrics showed the last finite loss of a diverged run (an alert on a NaN loss never fired) and the
  charts ended silently at the last finite step (found by review)."""
  run_dir = tmp_path / "diverged"
  writer = metrics.JsonlWriter(str(run_dir / "metrics.jsonl"))
  for step in range(1, 12):
    writer.write({"step": step, "time": 1.7e9 + step, "loss": 1.0 / step if step <= 10 else math.nan,
                  "grad_norm": 0.5 if step <= 10 else math.inf, "total_steps": 100})
  # A null, which numpy reads as NaN too, is a value not logged, not a non-finite one.
  writer.write({"step": 12, "time": 1.7e9 + 12, "loss": math.nan, "grad_norm": math.inf, "mfu": None})
  # A line with a value that is no number at all is read value by value: its "-inf" must still count.
  writer.write({"step": 13, "time": 1.7e9 + 13, "loss": math.nan, "grad_norm": -math.inf, "note": "diverged"})
  writer.close()
  run = dashboard.RunState(str(run_dir), "diverged")
  run.refresh()
  status = run.status(now=1.7e9 + 14)
  assert status["latest"]["loss"] == "nan" and status["latest"]["grad_norm"] == "-inf"
  assert status["nonfinite"] == {"loss": 13.0, "grad_norm": 13.0}
  assert status["step"] == 13 and status["total_steps"] == 100 and status["nonfinite_lines"] == 3
  loss = run.series(["loss"], 2000)["loss"]
  assert loss["step"].tolist() == list(range(1, 11))  # the finite points, as before
  assert loss["nonfinite"]["step"].tolist() == [11, 12, 13] and loss["nonfinite"]["value"] == ["nan"] * 3
  assert run.series(["grad_norm"], 2000)["grad_norm"]["nonfinite"]["value"] == ["inf", "inf", "-inf"]
  run_dir.joinpath("events.jsonl").write_text("")
  board = dashboard.Dashboard([str(run_dir)])
  board.runs[0] = run
  board.runs[0].loaded.set()
  text = board.prometheus_text()
  assert 'echo_loss{run="diverged"} NaN' in text and 'echo_grad_norm{run="diverged"} -Inf' in text
  families = {f.name: f for f in text_string_to_metric_families(text)}
  assert math.isnan(families["echo_loss"].samples[0].value)
  assert families["echo_nonfinite_lines_total"].samples[0].value == 3

  # A relaunch resumed from step 10 logs steps 11-13 again, finite: they replace the stopped run's, as any point.
  with open(run_dir / "metrics.jsonl", "a") as f:
    for step in (11, 12, 13):
      f.write(json.dumps({"step": step, "time": 1.8e9 + step, "loss": 0.05, "grad_norm": math.inf if step == 12
                          else 0.4}).replace("Infinity", '"inf"') + "\n")
  run.refresh()
  status = run.status(now=1.8e9 + 14)
  assert status["latest"]["loss"] == 0.05 and status["latest"]["grad_norm"] == 0.4 and status["nonfinite"] == {}
  assert run.series(["loss"], 2000)["loss"]["nonfinite"]["step"].tolist() == []
  assert run.series(["grad_norm"], 2000)["grad_norm"]["nonfinite"]["step"].tolist() == [12]


def test_every_processs_error_is_shown_and_those_of_earlier_launches_are_set_apart(tmp_path, monkeypatch):
  """Only process 0 writes events.jsonl: the error of process 1 (a damaged file of its part of the checkpoint) never
  reached the dashboard, which showed process 0's consequence of it (a lost peer) and its advice (found by review).
  Each process now writes its own errors/process_<I>.json; the dashboard shows them all, oldest first, and sets apart
  those older than the latest launch that got as far as training (its `start` event)."""
  monkeypatch.setattr(dashboard, "LISTING_INTERVAL_S", 0.0)
  run_dir = make_run(tmp_path)  # its `start` event is at 1.7e9
  errors = tmp_path / "run" / "errors"
  errors.mkdir()
  (errors / "process_0.json").write_text(json.dumps(
      {"time": 1.7e9 + 50, "process": 0, "host": "host-a", "pid": 11, "step": 2,
       "message": "CheckpointRestoreError: ... Gloo AllGather failed: Connection closed by peer"}))
  (errors / "process_1.json").write_text(json.dumps(
      {"time": 1.7e9 + 49, "process": 1, "host": "host-b", "pid": 12, "step": 2,
       "message": f"CheckpointRestoreError: ... OUT_OF_RANGE ... the step is damaged: move it aside {SCRIPT}"}))
  (errors / "process_2.json").write_text(json.dumps(  # a launch before the one of the `start` event
      {"time": 1.7e9 - 100, "process": 2, "host": "host-c", "pid": 13, "step": None, "message": "older"}))
  (errors / "process_3.json").write_text("{cut sho")
  (errors / "notes.txt").write_text("not an error file")
  board = dashboard.Dashboard([run_dir])
  board.runs[0].refresh()
  board.runs[0].loaded.set()
  status = board.runs_payload()["runs"][0]
  shown = [(e["process"], e["host"], e["step"], e["earlier_launch"]) for e in status["process_errors"]]
  assert shown == [(2, "host-c", None, True), (1, "host-b", 2, False), (0, "host-a", 2, False),
                   (3, None, None, False)]
  assert "OUT_OF_RANGE" in status["process_errors"][1]["message"] and status["process_errors"][1]["time"] == 1.7e9 + 49
  assert status["process_errors"][3]["message"].startswith("errors/process_3.json could not be read (JSONDecodeError")
  assert status["failed_processes"] == 3
  families = {f.name: f for f in text_string_to_metric_families(board.prometheus_text())}
  assert families["echo_failed_processes"].samples[0].value == 3
  # A relaunch that got as far as training: the errors before it are of earlier launches.
  with open(tmp_path / "run" / "events.jsonl", "a") as f:
    f.write(json.dumps({"time": 1.7e9 + 60, "event": "start", "step": 5}) + "\n")
  (errors / "process_3.json").unlink()
  board.runs[0].refresh()
  status = board.runs_payload()["runs"][0]
  assert [e["earlier_launch"] for e in status["process_errors"]] == [True, True, True]
  assert status["failed_processes"] == 0


def test_downsample_keeps_extremes_and_ends():
  values = np.sin(np.linspace(0, 50, 100_000))
  values[12_345] = 99.0
  values[67_890] = -99.0
  picks = dashboard.downsample_indices(values.size, values, 2000)
  assert picks.size <= 2000 and picks[0] == 0 and picks[-1] == values.size - 1
  assert np.all(np.diff(picks) > 0)
  assert 12_345 in picks and 67_890 in picks
  assert dashboard.downsample_indices(10, values[:10], 2000).tolist() == list(range(10))


STANDARD_KEYS = "loss,lr,grad_norm,samples_per_sec,steps_per_sec,mfu,data_wait,skipped_samples"


def _digits(values: np.ndarray, width: int) -> np.ndarray:
  """[n, width] ASCII digits of non-negative integers, right-aligned after spaces (JSON forbids leading zeros)."""
  powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
  shifted = values.astype(np.int64)[:, None] // powers
  significant = shifted > 0
  significant[:, -1] = True
  return np.where(significant, shifted % 10 + ord("0"), ord(" ")).astype(np.uint8)


def _decimal(values: np.ndarray, int_width: int, frac_width: int) -> np.ndarray:
  """[n, int_width + 1 + frac_width] ASCII of non-negative floats with a fixed number of fraction digits."""
  whole = np.floor(values)
  frac = np.minimum(np.round((values - whole) * 10.0**frac_width), 10**frac_width - 1).astype(np.int64)
  powers = 10 ** np.arange(frac_width - 1, -1, -1, dtype=np.int64)
  frac_digits = (frac[:, None] // powers % 10 + ord("0")).astype(np.uint8)
  point = np.full((values.size, 1), ord("."), np.uint8)
  return np.concatenate([_digits(whole, int_width), point, frac_digits], axis=1)


def write_trainer_metrics(path, n: int, spike_at: int) -> None:
  """`n` lines shaped like the trainer's (`Trainer._log_step`: 12 keys, 17-digit floats; about 350 bytes, more
  than a typical line, so the parsing measured is on the expensive side),
  built as byte arrays in numpy because formatting a million lines in Python would take longer than the test."""
  rng = np.random.default_rng(0)
  with open(path, "wb") as f:
    for begin in range(0, n, 250_000):
      step = np.arange(begin, min(n, begin + 250_000))
      size = step.size
      loss = 2.0 / (1 + step * 1e-4) + rng.random(size) * 0.05
      loss[step == spike_at] = 50.0
      fields = [
          ("step", _digits(step, 7)), ("time", _decimal(1.7e9 + step * 0.8123, 10, 7)),
          ("loss", _decimal(loss, 2, 16)), ("grad_norm", _decimal(1.0 + rng.random(size), 1, 16)),
          ("lr", _decimal(1e-4 * (1 - step / (2 * n)), 1, 17)), ("samples_seen", _digits(step * 256, 9)),
          ("samples_per_sec", _decimal(210.0 + rng.random(size), 3, 13)),
          ("steps_per_sec", _decimal(0.82 + rng.random(size) * 0.01, 1, 16)),
          ("step_time", _decimal(1.2 + rng.random(size) * 0.01, 1, 16)),
          ("data_wait", _decimal(rng.random(size) * 0.02, 1, 17)),
          ("mfu", _decimal(0.31 + rng.random(size) * 0.01, 1, 16)),
          ("total_steps", _digits(np.full(size, 2 * n), 7)),
      ]
      parts = []
      for i, (key, field) in enumerate(fields):
        prefix = ("{" if i == 0 else ", ") + f'"{key}": '
        parts += [np.broadcast_to(np.frombuffer(prefix.encode(), np.uint8), (size, len(prefix))), field]
      parts.append(np.broadcast_to(np.frombuffer(b"}\n", np.uint8), (size, 2)))
      f.write(np.concatenate(parts, axis=1).tobytes())


def test_trainer_lines_generated_as_valid_json(tmp_path):
  path = tmp_path / "m.jsonl"
  write_trainer_metrics(path, 300_001, spike_at=7)
  lines = path.read_bytes().splitlines()
  assert len(lines) == 300_001
  first, last = json.loads(lines[0]), json.loads(lines[-1])
  assert len(first) == 12 and first["step"] == 0 and first["samples_seen"] == 0
  assert last["step"] == 300_000 and last["samples_seen"] == 300_000 * 256
  assert json.loads(lines[7])["loss"] == 50.0
  assert 300 < len(lines[0]) < 400


def test_million_trainer_lines_answer_within_two_seconds(tmp_path):
  """The acceptance criterion: <= 2,000 points per series of a 1,000,000-line metrics.jsonl, in under 2 s.

  Measured exactly as a user meets it: the server starts (reading the file in the background from then on) and the
  page's request for the standard chart keys is sent at once and repeated until the answer is complete (not
  `loading`). Every request, the complete one included, must answer in under 2 s wall; the time from server start
  to the complete answer (the whole first read) is printed in wall and CPU time. CPU time (this process, server
  threads included) is what the code costs; wall time also counts whatever else shares the machine.
  """
  n = 1_000_000
  run = tmp_path / "big"
  run.mkdir()
  write_trainer_metrics(run / "metrics.jsonl", n, spike_at=777_777)
  api = f"/api/metrics?run=0&keys={STANDARD_KEYS}&max_points=2000"
  start, start_cpu = time.perf_counter(), time.process_time()
  srv = dashboard.make_server([str(run)], port=0)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  try:
    request_walls = []
    while True:
      sent = time.perf_counter()
      code, body, _ = _get(srv, api)
      request_walls.append(time.perf_counter() - sent)
      assert code == 200
      answer = json.loads(body)
      assert all(len(s["value"]) <= 2000 for s in answer["series"].values())
      if not answer["loading"]:
        break
      assert time.perf_counter() - start < 60, "first read of the metrics never finished"
    complete, complete_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"1e6 trainer lines: {len(request_walls)} request(s), slowest {max(request_walls):.2f} s wall; "
          f"server start to complete answer {complete:.2f} s wall, {complete_cpu:.2f} s CPU")
    assert max(request_walls) < 2.0, f"request walls {request_walls}"
    assert answer["rows"] == n  # no line lost where the file was read in chunks
    series = answer["series"]
    assert set(series) == set(STANDARD_KEYS.split(","))
    assert all(len(series[k]["value"]) > 1000 for k in STANDARD_KEYS.split(",") if k != "skipped_samples")
    assert max(series["loss"]["value"]) == 50.0  # the spike survives downsampling
    assert series["loss"]["step"][0] == 0 and series["loss"]["step"][-1] == n - 1
    with open(run / "metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": n, "time": 1.7e9 + n, "loss": 0.01, "lr": 1e-4}) + "\n")
    deadline = time.perf_counter() + 10 * dashboard.REFRESH_INTERVAL_S + 5
    while json.loads(_get(srv, "/api/runs")[1])["runs"][0]["rows"] == n:
      assert time.perf_counter() < deadline, "the appended line was never read"
      time.sleep(0.05)
    start, start_cpu = time.perf_counter(), time.process_time()
    code, body, _ = _get(srv, api)
    again, again_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    assert json.loads(body)["series"]["loss"]["step"][-1] == n
    assert again_cpu < 0.5, f"API answer after an append took {again_cpu:.2f} s CPU ({again:.2f} s wall)"
  finally:
    srv.shutdown()
    srv.server_close()


def test_answer_while_loading_is_partial_and_says_so(tmp_path, monkeypatch):
  """A request during the first read is answered with the lines read so far and `loading`, not blocked."""
  run = tmp_path / "slow"
  run.mkdir()
  write_trainer_metrics(run / "metrics.jsonl", 2_000, spike_at=5)
  release = threading.Event()
  read_new = dashboard.JsonlTail.read_new

  def stalled_read_new(self):
    for i, chunk in enumerate(read_new(self)):
      if i == 1:
        release.wait(20)
      yield chunk

  monkeypatch.setattr(dashboard, "READ_CHUNK_BYTES", 64 << 10)
  monkeypatch.setattr(dashboard, "FIRST_LOAD_WAIT_S", 0.2)
  monkeypatch.setattr(dashboard.JsonlTail, "read_new", stalled_read_new)
  srv = dashboard.make_server([str(run)], port=0)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  try:
    sent = time.perf_counter()
    answer = json.loads(_get(srv, "/api/metrics?run=0&keys=loss")[1])
    assert time.perf_counter() - sent < 5
    assert answer["loading"] and 0 < answer["rows"] < 2_000
    assert json.loads(_get(srv, "/api/runs")[1])["runs"][0]["loading"]
    release.set()
    deadline = time.perf_counter() + 10
    while answer["loading"]:
      assert time.perf_counter() < deadline
      answer = json.loads(_get(srv, "/api/metrics?run=0&keys=loss")[1])
    assert answer["rows"] == 2_000 and answer["series"]["loss"]["step"][-1] == 1_999
  finally:
    release.set()
    srv.shutdown()
    srv.server_close()


def test_monitor_on_a_taken_port_or_no_port_says_so_in_one_line(tmp_path):
  """The port taken (make demo's own dashboard listens on 8080) ended in `AttributeError: 'DashboardServer' object
  has no attribute 'dashboard'`, the cause buried in a chained traceback (found by review)."""
  (tmp_path / "run").mkdir()
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = subprocess.run([sys.executable, str(REPO / "monitor.py"), str(tmp_path / "run"), "--port", str(port)],
                            capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and result.stderr.strip() == (
      f"monitor.py: error: cannot listen on 127.0.0.1:{port} (Address already in use); pass --port N (0 picks a free "
      "one) or another --host"), result.stderr
  result = subprocess.run([sys.executable, str(REPO / "monitor.py"), str(tmp_path / "run"), "--port", "99999"],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "99999 is not a port (0-65535" in result.stderr, result.stderr
