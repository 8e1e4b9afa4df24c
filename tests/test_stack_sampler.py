"""bench/stack_sampler.py: a script's imports and its threads' work come out on the timeline with their durations."""

import subprocess
import sys
import textwrap
import time

from conftest import REPO

sys.path.insert(0, str(REPO))

from bench import stack_sampler  # noqa: E402 — bench/ is a folder of scripts beside the package

SLOW_LIBRARY = textwrap.dedent("""
    import time
    time.sleep(0.6)  # a slow import

    def work(seconds):
      time.sleep(seconds)
""")

SCRIPT = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, sys.argv[1])
    import slowlib
    worker = threading.Thread(target=slowlib.work, args=(0.6,), name="worker")
    worker.start()
    worker.join()
    if len(sys.argv) > 2:  # runs until killed
      slowlib.work(600)
""")


def write_script(tmp_path):
  library = tmp_path / "env" / "site-packages"
  library.mkdir(parents=True)
  (library / "slowlib.py").write_text(SLOW_LIBRARY)
  (tmp_path / "repo").mkdir()
  script = tmp_path / "repo" / "script.py"
  script.write_text(SCRIPT)
  return script, library


def test_imports_and_thread_work_are_on_the_timeline(tmp_path):
  script, library = write_script(tmp_path)
  out = tmp_path / "samples.json.gz"
  subprocess.run([sys.executable, str(REPO / "bench" / "stack_sampler.py"), str(out), str(script), str(library)],
                 check=True, timeout=60)
  recorded = stack_sampler.read(str(out))
  runs = stack_sampler.timeline(recorded)
  main = [(end - start, what) for start, end, what in runs["MainThread"]]
  assert any(what == "import slowlib" and seconds >= 0.45 for seconds, what in main), main
  worker = [(end - start, what) for start, end, what in runs["worker"]]
  assert any(what == "slowlib.py:work" and seconds >= 0.45 for seconds, what in worker), worker
  assert stack_sampler.import_seconds(recorded)["slowlib"] >= 0.45
  assert "import slowlib" in stack_sampler.report(str(out))


def test_a_requested_write_comes_while_the_script_runs_on(tmp_path):
  script, library = write_script(tmp_path)
  out = tmp_path / "samples.json.gz"
  process = subprocess.Popen([sys.executable, str(REPO / "bench" / "stack_sampler.py"), str(out), str(script),
                              str(library), "forever"])
  try:
    time.sleep(2.0)
    stack_sampler.request_write(str(out), timeout_s=30)
    assert process.poll() is None
    assert "worker" in stack_sampler.timeline(stack_sampler.read(str(out)))
  finally:
    process.kill()
    process.wait()
