"""Process set-up (echo_jax.runtime): the persistent compilation cache is used where it is safe; errors."""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import jax
import pytest
from conftest import REPO, cpu_env, free_port, load_config, write_synthetic_shards

from echo_jax import runtime

# One single-device process: enables the cache, compiles small programs (JAX's 1-second threshold for caching is
# lowered for them), and prints how many compiles the cache answered.
SINGLE_DEVICE = textwrap.dedent("""
    import sys
    import jax
    from echo_jax import runtime
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kwargs: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    print("enabled", runtime.enable_compilation_cache(sys.argv[1]))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    print("result", float(jax.jit(lambda x: (x @ x.T).sum())(jax.numpy.ones((64, 64)))))
    print("hits", len(hits))
""")


def test_compilation_cache_is_left_off_on_several_cpu_devices(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  assert jax.device_count() == 8
  assert runtime.enable_compilation_cache(str(tmp_path / "xla")) is False
  assert jax.config.jax_compilation_cache_dir == before
  assert not os.path.exists(tmp_path / "xla")


def test_compilation_cache_serves_a_relaunch_on_one_device(tmp_path):
  env = cpu_env(1)
  outputs = []
  for _ in range(2):
    process = subprocess.run([sys.executable, "-c", SINGLE_DEVICE, str(tmp_path / "xla")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr[-3000:]
    outputs.append(dict(line.split(" ", 1) for line in process.stdout.splitlines()))
  assert [o["enabled"] for o in outputs] == ["True", "True"]
  assert [o["result"] for o in outputs] == ["262144.0", "262144.0"]
  assert outputs[0]["hits"] == "0" and int(outputs[1]["hits"]) >= 1  # the relaunch compiled nothing itself
  assert os.listdir(tmp_path / "xla")


@pytest.mark.parametrize("directory, devices", [("", 1), ("xla", 2)])
def test_the_caches_left_off_stay_off_when_the_environment_names_a_directory(tmp_path, directory, devices):
  """JAX reads JAX_COMPILATION_CACHE_DIR by itself, and echo_jax's executable cache follows JAX's setting: an empty
  compile_cache_dir, and a CPU run over several devices (whose programs can deadlock loaded back), used both caches
  all the same (found by review)."""
  env = {**cpu_env(devices), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "from_env")}
  script = SINGLE_DEVICE + "from echo_jax import executable_cache\nprint('executables', executable_cache.directory())\n"
  process = subprocess.run([sys.executable, "-c", script, str(tmp_path / directory) if directory else ""], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=120)
  assert process.returncode == 0, process.stderr[-3000:]
  output = dict(line.split(" ", 1) for line in process.stdout.splitlines())
  assert output["enabled"] == "False" and output["executables"] == "None", output
  assert not (tmp_path / "from_env").exists() and not (tmp_path / "xla").exists()


def test_a_single_process_run_raises_its_error_as_usual():
  """Only a multi-process run exits at once on an error (tested with two hosts in test_launch.py): a single process
  keeps the exception, its traceback and its normal exit."""
  with pytest.raises(ValueError, match="bad config"), runtime.exit_at_once_on_error():
    raise ValueError("bad config")


# One of two hosts joined on localhost: fails inside `exit_at_once_on_error`, process 0 at once and process 1 a second
# later (hosts that meet one fault rarely fail at the same instant); process 0 with a refused config, process 1 with
# any other error.
FAILING_HOST = textwrap.dedent("""
    import sys, time
    import jax
    from echo_jax import runtime
    from echo_jax.errors import ConfigError
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    with runtime.exit_at_once_on_error():
      time.sleep(jax.process_index())
      error = RuntimeError if jax.process_index() else ConfigError
      raise error(f"the own error of process {jax.process_index()}")
""")


def test_hosts_failing_a_moment_apart_each_print_their_own_error():
  """Process 0 hosts JAX's coordination service: were it to leave at once, process 1, failing a second later, would
  be aborted by its runtime (SIGABRT) before printing its error. With `EXIT_DELAY_PROCESS_0_S` set to 0 it was. A
  refused config prints its message alone (it says what to do); another error keeps its traceback."""
  address = f"127.0.0.1:{free_port()}"
  hosts = [subprocess.Popen([sys.executable, "-c", FAILING_HOST, address, str(index)], cwd=REPO, env=cpu_env(1),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in range(2)]
  outputs = [host.communicate(timeout=120)[0] for host in hosts]
  assert [host.returncode for host in hosts] == [1, 1], outputs
  assert "error: the own error of process 0" in outputs[0] and "Traceback" not in outputs[0], outputs[0][-3000:]
  assert "Traceback" in outputs[1] and "RuntimeError: the own error of process 1" in outputs[1], outputs[1][-3000:]


WATCHDOG = textwrap.dedent("""
    import time
    from echo_jax import runtime
    runtime.HangWatchdog(0, "never armed")  # train.hang_timeout=0: no watchdog at all
    beaten = runtime.HangWatchdog(1.0, "nothing happened")
    for _ in range(8):  # 2 s of beats, each within the timeout
      time.sleep(0.25)
      beaten.beat()
    beaten.stop()
    time.sleep(1.5)  # stopped: it no longer fires
    print("survived", flush=True)
    import io, sys
    sys.stderr = io.StringIO()  # no file descriptor, as in a notebook: the stacks still reach the process's stderr
    runtime.HangWatchdog(1.0, "nothing happened")
    def stuck_here():
      time.sleep(60)
    stuck_here()
""")


def test_the_hang_watchdog_ends_a_stuck_process_with_every_stack_and_spares_a_live_one():
  started = time.time()
  process = subprocess.run([sys.executable, "-c", WATCHDOG], cwd=REPO, env=cpu_env(1), capture_output=True,
                           text=True, timeout=60)
  assert process.returncode == 1 and "survived" in process.stdout, process.stderr
  assert "in stuck_here" in process.stderr  # faulthandler's stack of the main thread
  assert time.time() - started < 30


# A run whose data read hangs for good after 3 batches.
STUCK_RUN = textwrap.dedent("""
    import json, sys, threading
    import ml_collections
    from echo_jax.data import pipeline
    from echo_jax.train.loop import Trainer
    read = pipeline.StreamSet.__next__
    calls = []
    def next_or_hang(self):
      calls.append(1)
      if len(calls) > 3:
        threading.Event().wait()  # a read on a dead mount
      return read(self)
    pipeline.StreamSet.__next__ = next_or_hang
    Trainer(ml_collections.ConfigDict(json.loads(sys.argv[1])), sys.argv[2]).run()
""")


# A launch whose shard listing never returns (a gs:// or Hub listing stuck).
STUCK_LAUNCH = textwrap.dedent("""
    import json, sys, threading
    import ml_collections
    from echo_jax.train import loop
    def list_or_hang(spec):
      threading.Event().wait()
    loop.list_shards = list_or_hang
    loop.Trainer(ml_collections.ConfigDict(json.loads(sys.argv[1])), sys.argv[2]).run()
""")


def test_a_launch_stuck_before_its_first_step_exits_with_its_stacks(tmp_path):
  """Before, nothing watched a launch until its first step: one host stuck listing or restoring held every host of
  a pod in silence (seen with 2 processes, one of whose restores was made to hang: both still ran when killed at
  480 s, with train.hang_timeout at 20 s)."""
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards")
  # 6 s: the state's trace before the listing took seconds on a loaded machine.
  config.train.update(steps=100, eval_every=0, setup_timeout=6.0)
  process = subprocess.run([sys.executable, "-c", STUCK_LAUNCH, config.to_json(), str(tmp_path / "run")], cwd=REPO,
                           env=cpu_env(1), capture_output=True, text=True, timeout=240)
  assert process.returncode == 1, process.stderr[-3000:]
  assert re.search(r"the launch did not reach its first step \(train.setup_timeout\) for [6-9] s", process.stderr)
  assert "in list_or_hang" in process.stderr
  assert_reported_stuck(tmp_path / "run", "the launch did not reach its first step", step=None)


def test_a_run_whose_data_read_hangs_exits_with_its_stacks(tmp_path):
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards")
  # A given peak: the matmul that measures it, inside the watched time, took over 3 s on a loaded CI machine, and the
  # watchdog fired there instead of in the hung read.
  config.train.update(steps=100, eval_every=0, log_every=1, hang_timeout=5.0, cpu_peak_flops=1e10)
  process = subprocess.run([sys.executable, "-c", STUCK_RUN, config.to_json(), str(tmp_path / "run")], cwd=REPO,
                           env=cpu_env(1), capture_output=True, text=True, timeout=240)
  assert process.returncode == 1, process.stderr[-3000:]
  assert re.search(r"no training step finished \(train.hang_timeout\) for [5-7] s", process.stderr)
  assert "in next_or_hang" in process.stderr
  assert_reported_stuck(tmp_path / "run", "no training step finished", step=3)


def assert_reported_stuck(workdir, what: str, step: int | None) -> None:
  """A stuck process leaves what stopped it where the dashboard looks, as an error does: its error file and the
  run's events. Before, only its log had it."""
  error = json.loads((workdir / "errors" / "process_0.json").read_text())
  assert error["message"].startswith(f"RunStuckError: {what}") and error["step"] == step, error
  events = [json.loads(line) for line in (workdir / "events.jsonl").read_text().splitlines() if line.strip()]
  stopped = [event for event in events if event["event"] == "error"]
  assert len(stopped) == 1 and what in stopped[0]["message"] and stopped[0]["step"] == step, events
