"""Test set-up: CPU only, 8 host-platform devices (sharding tests), and small synthetic data."""

import os

# XLA's CPU back end without LLVM's optimizations, and with its older loop emitters instead of the fusion emitters:
# compiling is most of this suite's time. The tiny config's train step (8 devices, tracing included) compiles in
# 4.2-4.6 s this way, 6.9-7.3 s with the fusion emitters and 9.7 s with neither flag; 50 of its steps then take
# 3.7-5 s, against 3.5 s fully optimized (a noisy 2-core machine). Every test process gets it, the subprocesses too
# (`cpu_env`).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

# Before JAX is imported anywhere: 8 CPU devices let sharding tests build real meshes on one machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE

import contextlib  # noqa: E402
import pathlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from echo_jax.config import load_config_file  # noqa: E402
from echo_jax.data.shards import Sample, write_shard  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent

# No persistent compilation cache here: on 8 CPU devices, programs with collectives loaded back from it can deadlock
# (see echo_jax.runtime.enable_compilation_cache), so every test compiles what it runs.


def cpu_env(devices: int = 1, **variables: str) -> dict[str, str]:
  """The environment for a test's subprocess on `devices` host CPU devices, compiled as in this process
  (FAST_COMPILE), with `variables` set."""
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}", **variables)


def wait_for(condition, timeout: float = 30.0) -> None:
  """Returns once `condition()` is true; fails the test after `timeout` seconds."""
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, "timed out"
    time.sleep(0.02)


def free_port() -> int:
  """A TCP port free on localhost now (for a JAX coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def load_config(name: str) -> ml_collections.ConfigDict:
  """`get_config()` of configs/NAME.py."""
  return load_config_file(str(REPO / "configs" / f"{name}.py"))


def write_synthetic_shards(directory: pathlib.Path, *, num_shards: int = 2, per_shard: int = 4,
                           latent_dim: int = 8, max_frames: int = 32, ref_frames: int = 20, seed: int = 0,
                           prefix: str = "train") -> str:
  """Shards of random latents (unit variance, like normalised codec latents) with distinct texts; returns a glob."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  for shard in range(num_shards):
    samples = []
    for i in range(per_shard):
      frames = int(rng.integers(max_frames // 2, max_frames + 1))
      samples.append(Sample(
          key=f"{prefix}{shard}_{i}",
          latent=rng.standard_normal((frames, latent_dim)).astype(np.float16),
          ref=rng.standard_normal((ref_frames, latent_dim)).astype(np.float16),
          meta={"text": f"[S1] sample {shard} {i} {'ab' * i}"}))
    write_shard(str(directory / f"{prefix}-{shard:05d}.tar"), samples)
  return str(directory / f"{prefix}-*.tar")


@pytest.fixture
def tiny_config(tmp_path: pathlib.Path) -> ml_collections.ConfigDict:
  """configs/tiny.py on 16 synthetic training samples and 4 held-out ones."""
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards")
  config.data.eval_shards = write_synthetic_shards(tmp_path / "shards", num_shards=1, seed=1, prefix="eval")
  return config


@contextlib.contextmanager
def claimed_elsewhere(workdir: pathlib.Path | str, process: int, env: dict[str, str] | None = None) -> Iterator[int]:
  """Another process (a stale trainer) holds process `process`'s claim on `workdir` (storage.RunDirectoryClaim)
  inside the block; yields its pid. It is killed (SIGKILL) at the end, which releases a local claim; a remote one's
  lease stays, naming a pid that no longer runs."""
  holder = subprocess.Popen(
      [sys.executable, "-c", "import time; from echo_jax import storage; "
       f"claim = storage.RunDirectoryClaim({str(workdir)!r}, {process}); print('claimed', flush=True); "
       "time.sleep(600)"], cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
  try:
    assert holder.stdout.readline().strip() == "claimed"
    yield holder.pid
  finally:
    holder.kill()
    holder.wait()
