"""Ahead-of-time compilation for TPU topologies (needs libtpu, no TPU) and the HBM pre-flight check."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import jax
import pytest
from conftest import load_config
from jax.sharding import NamedSharding, PartitionSpec

from echo_jax import aot, runtime, sharding

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def max_batch_record(tmp_path_factory: pytest.TempPathFactory) -> dict:
  """The CLI end to end: --find_max_batch on the tiny config for a v4-8, capped at 8 (two compiles)."""
  out = tmp_path_factory.mktemp("aot") / "aot.jsonl"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = ""  # the CLI sees the real host, not the test's 8 fake CPU devices
  result = subprocess.run(
      [sys.executable, "-m", "echo_jax.aot", "--config", str(REPO / "configs" / "tiny.py"), "--topology", "v4-8",
       "--find_max_batch", "--max_batch=8", f"--json_out={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "largest global batch under 90% of HBM: 8" in result.stdout
  assert "per-chip peak" in result.stdout
  return json.loads(out.read_text().splitlines()[-1])


def test_find_max_batch_on_tiny_reports_memory_and_flops(max_batch_record: dict):
  record = max_batch_record
  # 4 data-parallel devices: batch 4 fits, 8 fits and is the cap.
  assert [r["batch_size"] for r in record["tried"]] == [4, 8]
  assert record["max_batch"] == 8
  best = record["best"]
  assert best["devices"] == 4 and best["hosts"] == 1 and best["device_kind"] == "TPU v4"
  assert best["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert best["fits_compiler"]
  # Parameters and two Adam moments in float32, sharded over 4 chips where the shapes allow.
  state_bytes = 3 * 4 * best["params"]
  assert state_bytes / 4 <= best["train"]["arguments"] <= state_bytes * 1.1
  assert best["total_bytes"] >= best["train"]["arguments"] > 0
  assert 0 < best["hbm_fraction"] < 0.9
  assert best["compile_seconds"] > 0
  # XLA's count (per-device program × 4) and the analytic matmul count agree to within a small factor.
  assert 0.25 < best["xla_flops"] / best["analytic_flops"] < 4
  assert best["step_seconds_at_mfu"] == pytest.approx(best["analytic_flops"] / (0.4 * 275e12 * 4))


def test_search_max_batch_doubles_then_bisects():
  best, tried = aot.search_max_batch(lambda batch: batch <= 44, unit=4, cap=4096)
  assert best == 44
  assert tried[:5] == [4, 8, 16, 32, 64]  # doubling until 64 fails, then bisection over multiples of 4
  assert all(b % 4 == 0 for b in tried) and 48 in tried


def test_search_max_batch_cap_and_nothing_fits():
  assert aot.search_max_batch(lambda batch: True, unit=8, cap=48) == (48, [8, 16, 32, 48])
  assert aot.search_max_batch(lambda batch: False, unit=8, cap=48) == (0, [8])


def test_topologies_resolve_to_their_devices():
  devices = aot.topology_devices("v4-64")
  assert len(devices) == 32 and len({d.process_index for d in devices}) == 8
  assert devices[0].device_kind == "TPU v4"
  assert len(aot.topology_devices("v4-8")) == 4
  assert len(aot.topology_devices("v5e-16")) == 16


def test_a_mesh_that_does_not_fit_the_slices_torus_says_which_field_to_change():
  """JAX's NotImplementedError advised allow_split_physical_axes, an argument no config field sets, and reached the
  trainer raw only once the pod was up (found by review)."""
  with pytest.raises(ValueError, match=r"config\.mesh \{'data': 2, 'fsdp': 8, 'tensor': 2\} does not fit the torus "
                                       r"of these 32 TPU chips.*Change config\.mesh"):
    sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2}, aot.topology_devices("v4-64"))


def test_on_a_v4_64_each_host_holds_interleaved_rows_that_the_data_streams_must_fit():
  """The mesh over a slice follows the chips' torus, so under FSDP over 32 chips each host holds 4 blocks of 8 rows
  of 256: the trainer needs data.streams to cut the batch at 8 rows, and the AOT report says so for a config that
  does not (before 2026-11-28 every host of a v4-64 was refused at its launch, after the compile)."""
  config = load_config("tiny")
  mesh = sharding.make_mesh(config.mesh.to_dict(), aot.topology_devices("v4-64"))
  rows = sharding.batch_sharding(mesh, 1)
  blocks = [runtime.process_batch_rows(rows, 256, process) for process in range(8)]
  assert all(len(host) == 4 and all(stop - start == 8 for start, stop in host) for host in blocks)
  assert sorted(row for host in blocks for start, stop in host for row in range(start, stop)) == list(range(256))
  config.data.streams = 8  # a multiple of the host count, yet streams of 32 rows
  assert "a multiple of 32 that divides train.batch_size=256" in aot.streams_problem(config, mesh, 256)
  config.data.streams = 32
  assert aot.streams_problem(config, mesh, 256) == ""


def test_bad_topology_and_missing_libtpu_say_what_to_do(monkeypatch: pytest.MonkeyPatch):
  with pytest.raises(ValueError, match="unknown topology 'v9-8'; known: v4-8"):
    aot.topology_devices("v9-8")
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
  with pytest.raises(RuntimeError, match=r'pip install "libtpu==0\.0\.42\.1"'):
    aot.topology_devices("v4-8")


class _FakeCompiled:
  def __init__(self, temp_bytes: int):
    self.temp_bytes = temp_bytes

  def memory_analysis(self) -> SimpleNamespace:
    return SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=100, alias_size_in_bytes=100,
                           temp_size_in_bytes=self.temp_bytes, generated_code_size_in_bytes=10)


class _FakeDevice:
  def __init__(self, device_kind: str = "fake", bytes_limit: int = 1000):
    self.device_kind, self.bytes_limit = device_kind, bytes_limit

  def memory_stats(self) -> dict:
    return {"bytes_limit": self.bytes_limit, "bytes_in_use": 0}


def test_check_memory_raises_above_limit_and_warns_with_force():
  device = [_FakeDevice()]
  usage = aot.check_memory(_FakeCompiled(temp_bytes=700), device)  # 100 + 700 + 10 = 810 of 1000: at 81%
  assert usage is not None and usage.total == 810
  with pytest.raises(aot.MemoryLimitError, match=r"needs .* \(91% of the .*--force"):
    aot.check_memory(_FakeCompiled(temp_bytes=800), device)  # 910 > 900
  with pytest.warns(RuntimeWarning, match="continuing because of --force"):
    assert aot.check_memory(_FakeCompiled(temp_bytes=800), device, force=True).total == 910
  with pytest.raises(aot.MemoryLimitError):
    aot.check_memory(_FakeCompiled(temp_bytes=500), device, limit_fraction=0.5)  # 610 > 500


def test_a_tpu_step_is_checked_against_the_chips_hbm_as_ahead_of_time_and_never_past_the_runtimes_limit():
  """The ahead-of-time search (`--find_max_batch`) measures against the chip's 32 GiB, the runtime lets a v4 device
  use a little less (bytes_limit): measured against that, batches the search found under 90% were refused at their
  launch on the pod, after the compile (e.g. echo_840m's 736 at 28.64 GiB, 93% of a 30.75 GiB limit)."""
  v4 = [_FakeDevice("TPU v4", bytes_limit=int(30.75 * aot.GiB))]

  def step(gib: float) -> _FakeCompiled:
    return _FakeCompiled(temp_bytes=int(gib * aot.GiB) - 110)

  assert aot.check_memory(step(28.64), v4).total == int(28.64 * aot.GiB)
  with pytest.raises(aot.MemoryLimitError, match=r"needs 28\.90 GiB per device \(90% of the chip's 32 GiB of HBM; "
                                                 r"at most 90% allowed\)"):
    aot.check_memory(step(28.9), v4)  # 90.3%
  small = [_FakeDevice("TPU v4", bytes_limit=20 * aot.GiB)]  # a runtime that allows less than 90%: its limit holds
  with pytest.raises(aot.MemoryLimitError, match=r"\(66% of the chip's 32 GiB of HBM; at most 90% allowed; the "
                                                 r"runtime allows 20\.00 GiB\)"):
    aot.check_memory(step(21), small)


def test_check_memory_counts_what_stays_resident_beside_the_step():
  device = [_FakeDevice()]
  aot.check_memory(_FakeCompiled(temp_bytes=700), device, name="eval step", resident=80)  # 890 of 1000
  with pytest.raises(aot.MemoryLimitError, match=r"the eval step needs .* \(91% of .*optimizer state held beside"):
    aot.check_memory(_FakeCompiled(temp_bytes=700), device, name="eval step", resident=100)  # 910 > 900


def test_bytes_per_device_counts_one_devices_shards():
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})  # the 8 test devices on fsdp
  split = jax.ShapeDtypeStruct((16, 4), "float32", sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
  whole = jax.ShapeDtypeStruct((16, 4), "bfloat16", sharding=NamedSharding(mesh, PartitionSpec()))
  assert sharding.bytes_per_device({"a": split, "b": whole}) == 2 * 4 * 4 + 16 * 4 * 2
  assert sharding.bytes_per_device([jax.ShapeDtypeStruct((3,), "int32")]) == 12


def test_check_memory_is_a_no_op_on_cpu():
  compiled = jax.jit(lambda x: x * 2).lower(jax.ShapeDtypeStruct((4,), "float32")).compile()
  assert aot.check_memory(compiled, jax.devices()) is None


@pytest.mark.parametrize("flag, problem", [("--batch_size=0", "--batch_size must be positive"),
                                           ("--mfu=0", "--mfu must be in (0, 1]"),
                                           ("--limit_fraction=1.5", "--limit_fraction must be in (0, 1]"),
                                           ("--json_out=/no/such/directory/aot.jsonl",
                                            "--json_out must be a file in an existing directory")])
def test_bad_cli_values_are_refused_before_any_compile(flag, problem):
  """--batch_size 0 was taken for the config's batch, --mfu 0 ended in a ZeroDivisionError after the compile, and
  an unwritable --json_out lost the record of a search of many compiles (found by review)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  result = subprocess.run([sys.executable, "-m", "echo_jax.aot", "--config", str(REPO / "configs" / "tiny.py"),
                           "--topology", "v4-8", flag], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and problem in result.stderr, result.stderr[-2000:]
  assert "compile" not in result.stdout


def test_a_step_without_memory_analysis_is_trained_with_a_warning():
  """Nothing to check against: said, and the check skipped rather than the run refused."""
  class NoAnalysis:
    def memory_analysis(self):
      return None

  with pytest.warns(RuntimeWarning, match="no memory analysis for the compiled train step; the check .* is skipped"):
    assert aot.check_memory(NoAnalysis(), [_FakeDevice()]) is None
