"""Process set-up (echo_jax.runtime): the persistent compilation cache is used where it is safe; errors."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest
from conftest import REPO, cpu_env

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


def test_a_single_process_run_raises_its_error_as_usual():
  """Only a multi-process run exits at once on an error (tested with two hosts in test_launch.py): a single process
  keeps the exception, its traceback and its normal exit."""
  with pytest.raises(ValueError, match="bad config"), runtime.exit_at_once_on_error():
    raise ValueError("bad config")
