"""Ahead-of-time compilation for a TPU topology from any machine, and the HBM pre-flight check (DESIGN §5, §12).

With `libtpu` installed, `jax.experimental.topologies` describes the devices of a TPU slice that is not attached;
the real train step (`StepFunctions.compile`) compiles for a mesh over them, and XLA's memory analysis says how
much HBM each chip needs before a pod is paid for:

    python -m echo_jax.aot --config configs/echo_1p3b.py --topology v4-64 [--batch_size 256] [--find_max_batch]
        [--mfu 0.4] [--json_out out.jsonl] [--config.model.remat=full]

`check_memory` is the same check for the trainer: after compiling on the real devices it stops a run whose step
needs more than 90% of a device's HBM (a warning instead with `force=True`), counted against the same figure.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from echo_jax import executable_cache, metrics, runtime, sharding
from echo_jax.config import model_config
from echo_jax.data.pipeline import batch_streams
from echo_jax.errors import UserError
from echo_jax.model import Echo
from echo_jax.train.state import count_params, example_inputs
from echo_jax.train.step import StepFunctions, sharded_abstract_state

GiB = 1024**3
LIBTPU_PIN = "libtpu==0.0.42.1"  # the version jax 0.10.2's `tpu` extra pins

# HBM per JAX device (a v4 chip in megacore mode is one device).
HBM_BYTES_PER_DEVICE = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,
    "TPU v6 lite": 32 * GiB,
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice as `get_topology_desc` names it: chip grid, chip mode and the chips one host drives."""

  name: str  # e.g. "v4:2x4x4"
  chip_config: str
  chips_per_host: tuple[int, int, int]


def _v4(grid: str) -> Topology:
  return Topology(f"v4:{grid}", "megacore", (2, 2, 1))


def _lite(generation: str, grid: str) -> Topology:
  # A single-host v5e/v6e slice drives all 8 chips from one host; pods have 4 chips per host.
  return Topology(f"{generation}:{grid}", "default", (2, 4, 1) if grid == "2x4" else (2, 2, 1))


TOPOLOGIES = {
    "v4-8": _v4("2x2x1"), "v4-16": _v4("2x2x2"), "v4-32": _v4("2x2x4"), "v4-64": _v4("2x4x4"),
    **{f"{gen}-{math.prod(map(int, grid.split('x')))}": _lite(gen, grid)
       for gen in ("v5e", "v6e") for grid in ("2x2", "2x4", "4x4", "8x8")},
}


class MemoryLimitError(UserError, RuntimeError):
  """The compiled step needs more device memory than the allowed fraction."""


@dataclasses.dataclass(frozen=True)
class MemoryUsage:
  """Per-device bytes of one compiled executable, from XLA's memory analysis."""

  arguments: int
  outputs: int
  aliased: int  # outputs that reuse (donated) argument buffers
  temporaries: int
  generated_code: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  @classmethod
  def of(cls, compiled: Any) -> MemoryUsage:
    stats = executable_cache.memory_analysis(compiled)
    if stats is None:
      raise ValueError("this backend gives no memory analysis for the compiled step")
    return cls(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
               aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
               generated_code=stats.generated_code_size_in_bytes)


def device_memory_limit(devices: Sequence[jax.Device]) -> int | None:
  """Bytes one device may use (`bytes_limit` of TPU/GPU memory stats); None where there is no limit (CPU)."""
  try:
    stats = devices[0].memory_stats()
  except jax.errors.JaxRuntimeError:  # devices of a topology description are not attached
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def check_memory(compiled: Any, devices: Sequence[jax.Device], limit_fraction: float = 0.9,
                 force: bool = False, name: str = "train step", resident: int = 0) -> MemoryUsage | None:
  """Raises MemoryLimitError when the step (`name`) needs more than `limit_fraction` of a device's memory, counting
  `resident` bytes per device that stay allocated beside it (the optimizer state, for the eval step).

  With `force`, warns instead. Returns the usage, or None where the devices report no limit (CPU).
  """
  limit = device_memory_limit(devices)
  if limit is None:
    return None
  # A TPU's HBM is the chip's, from the table the ahead-of-time check uses, so that a batch `--find_max_batch` finds
  # fitting is one the trainer accepts. The runtime lets a device use a little less (bytes_limit: public threads
  # show 30.75-31.75 GiB of a v4's 32): the bound itself where the chip is not in the table (a GPU), and a hard bound
  # everywhere.
  hbm = HBM_BYTES_PER_DEVICE.get(devices[0].device_kind)
  allowed = min(limit_fraction * hbm, limit) if hbm else limit_fraction * limit
  capacity = hbm or limit
  try:
    usage = MemoryUsage.of(compiled)
  except ValueError:  # nothing to check against: say so rather than refuse to train
    warnings.warn(f"this backend gives no memory analysis for the compiled {name}; the check that it fits in "
                  f"{limit_fraction:.0%} of device memory is skipped", RuntimeWarning, stacklevel=2)
    return None
  needed = usage.total + resident
  if needed > allowed:
    beside = f", and {resident / GiB:.2f} GiB of optimizer state held beside it" if resident else ""
    of = f"the chip's {hbm / GiB:.0f} GiB of HBM" if hbm else f"the {limit / GiB:.2f} GiB the runtime allows"
    over = f"; the runtime allows {limit / GiB:.2f} GiB" if hbm and allowed == limit else ""
    message = (f"the {name} needs {needed / GiB:.2f} GiB per device ({needed / capacity:.0%} of {of}; at most "
               f"{limit_fraction:.0%} allowed{over}): arguments "
               f"{usage.arguments / GiB:.2f} GiB, temporaries {usage.temporaries / GiB:.2f} GiB{beside}. Lower "
               "train.batch_size, use --config.model.remat=full, or shard over more devices; run "
               "`python -m echo_jax.aot --config <this config> --topology <this slice> --find_max_batch` to find "
               "the batch that fits")
    if not force:
      raise MemoryLimitError(message + ", or pass --force to try anyway")
    warnings.warn(message + " (continuing because of --force)", RuntimeWarning, stacklevel=2)
  return usage


def topology_devices(topology: str) -> list[jax.Device]:
  """The devices of a named TPU slice (see TOPOLOGIES), without the slice being attached."""
  if topology not in TOPOLOGIES:
    raise ValueError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(f"compiling for a TPU topology needs libtpu: pip install \"{LIBTPU_PIN}\"")
  # libtpu takes a one-process lock meant for attached chips; compiling for a description of them touches none,
  # so a test or a second compile may run beside another process that has loaded libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # noqa: PLC0415 (only this path needs libtpu)
  spec = TOPOLOGIES[topology]
  desc = topologies.get_topology_desc(platform="tpu", topology_name=spec.name, chip_config_name=spec.chip_config,
                                      chips_per_host_bounds=spec.chips_per_host, num_slices=1)
  return list(desc.devices)


def _is_out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error)


@dataclasses.dataclass
class AotReport:
  """One compile of the train (and eval) step for a topology at one global batch size."""

  topology: str
  device_kind: str
  devices: int
  hosts: int
  mesh: dict[str, int]
  params: int
  batch_size: int
  remat: str
  hbm_bytes: int
  compile_seconds: float
  fits_compiler: bool  # False when XLA itself refused: the program cannot be laid out in HBM
  error: str = ""
  train: MemoryUsage | None = None
  eval_total: int = 0  # the eval step's total with the optimizer state, which stays on the devices beside it
  # XLA's count for the whole slice (per-device program × devices). It includes remat recompute but counts a
  # while-loop body once, so with scanned layers it is far below the real figure; the analytic count is the one
  # to plan with.
  xla_flops: float = 0.0
  analytic_flops: float = 0.0  # metrics.train_flops_per_step: model FLOPs, remat not counted
  peak_flops: float = 0.0  # per device
  # Why config.data.streams cannot fill some host's rows of the batch on this mesh, which the trainer refuses at its
  # launch ("" when it can): on a slice the mesh follows the torus, and the hosts interleave along the batch.
  data_streams: str = ""

  @property
  def total(self) -> int:
    return max(self.train.total, self.eval_total) if self.train else 0

  def fraction(self) -> float:
    return self.total / self.hbm_bytes if self.fits_compiler else math.inf

  def step_seconds(self, mfu: float) -> float:
    return self.analytic_flops / (mfu * self.peak_flops * self.devices)

  def to_json(self, mfu: float) -> dict[str, Any]:
    record = dataclasses.asdict(self)
    record.update(total_bytes=self.total, hbm_fraction=self.fraction() if self.fits_compiler else None,
                  mfu=mfu, step_seconds_at_mfu=self.step_seconds(mfu))
    return record


def compile_report(config: ml_collections.ConfigDict, topology: str, batch_size: int | None = None,
                   devices: Sequence[jax.Device] | None = None) -> AotReport:
  """Compiles the real train and eval steps of `config` for `topology` and reads XLA's memory and FLOP counts."""
  devices = list(devices) if devices is not None else topology_devices(topology)
  batch_size = config.train.batch_size if batch_size is None else batch_size
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  sharding.check_batch_size(mesh, batch_size)
  model = Echo(model_config(config))
  abstract_state = sharded_abstract_state(model, config, mesh)  # traced once, for the report and the compile
  kind = devices[0].device_kind
  data = config.data
  report = AotReport(
      topology=topology, device_kind=kind, devices=len(devices), hosts=len({d.process_index for d in devices}),
      mesh=dict(mesh.shape), params=count_params(abstract_state.params), batch_size=batch_size,
      remat=config.model.remat, hbm_bytes=HBM_BYTES_PER_DEVICE[kind], compile_seconds=0.0, fits_compiler=True,
      analytic_flops=metrics.train_flops_per_step(model.cfg, batch_size, data.max_frames, data.max_text_len,
                                                  data.max_ref_frames),
      peak_flops=next(peak for name, peak in metrics.PEAK_FLOPS_PER_DEVICE.items() if kind.startswith(name)))
  report.data_streams = streams_problem(config, mesh, batch_size)
  start = time.perf_counter()
  try:
    steps = StepFunctions.compile(model, config, mesh, example_inputs(config, batch_size),
                                  abstract_state=abstract_state)
  except jax.errors.JaxRuntimeError as error:
    if not _is_out_of_memory(error):
      raise
    report.fits_compiler, report.error = False, str(error).splitlines()[0]
  report.compile_seconds = time.perf_counter() - start
  if report.fits_compiler:
    report.train = MemoryUsage.of(steps.train)
    report.eval_total = MemoryUsage.of(steps.eval).total + sharding.bytes_per_device(abstract_state.opt_state)
    report.xla_flops = steps.train_flops * len(devices)
  return report


def streams_problem(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch_size: int) -> str:
  """Why config.data.streams cannot fill the batch rows that some host of `mesh` holds (`data.pipeline.batch_streams`
  says what to set), or "" when it fills every host's."""
  for process in sorted({device.process_index for device in mesh.devices.flat}):
    try:
      batch_streams(batch_size, config.data.streams,
                    runtime.process_batch_rows(sharding.batch_sharding(mesh, 1), batch_size, process))
    except ValueError as error:
      return f"host {process}: {error}"
  return ""


def search_max_batch(fits: Callable[[int], bool], unit: int, cap: int) -> tuple[int, list[int]]:
  """The largest multiple of `unit` up to `cap` for which `fits` holds (0 if none): doubling, then bisection.

  Assumes memory grows with the batch. Returns it and every size tried, in order.
  """
  tried: list[int] = []

  def probe(batch: int) -> bool:
    tried.append(batch)
    return fits(batch)

  if not probe(unit):
    return 0, tried
  low = 1  # in units; low fits, high does not (or is past the cap)
  while True:
    high = min(2 * low, cap // unit)
    if high == low:
      return low * unit, tried
    if not probe(high * unit):
      break
    low = high
  while high - low > 1:
    middle = (low + high) // 2
    if probe(middle * unit):
      low = middle
    else:
      high = middle
  return low * unit, tried


def find_max_batch(config: ml_collections.ConfigDict, topology: str, limit_fraction: float = 0.9,
                   cap: int = 4096) -> tuple[AotReport | None, list[AotReport]]:
  """The largest global batch (a multiple of the data-parallel size, at most `cap`) whose step fits under
  `limit_fraction` of HBM: (its report or None when even one sample per device does not fit, every report)."""
  devices = topology_devices(topology)
  mesh_shape = sharding.mesh_shape(config.mesh.to_dict(), len(devices))
  unit = mesh_shape[0] * mesh_shape[1]  # batches are sharded over data × fsdp
  reports: dict[int, AotReport] = {}

  def fits(batch: int) -> bool:
    reports[batch] = compile_report(config, topology, batch, devices)
    print(_row(reports[batch]), flush=True)
    return reports[batch].fraction() <= limit_fraction

  best, tried = search_max_batch(fits, unit, max(cap, unit))
  return reports.get(best), [reports[b] for b in tried]


def _row(report: AotReport, mfu: float = 0.4) -> str:
  if not report.fits_compiler:
    return (f"{report.topology:>7} batch {report.batch_size:>5}: does not fit ({report.error}); "
            f"compile {report.compile_seconds:.1f} s")
  return (f"{report.topology:>7} batch {report.batch_size:>5}: {report.total / GiB:7.2f} GiB/chip "
          f"({report.fraction():6.1%} of HBM); compile {report.compile_seconds:.1f} s; "
          f"step {report.step_seconds(mfu) * 1e3:.0f} ms at {mfu:.0%} MFU")


def format_report(report: AotReport, mfu: float) -> str:
  """A human-readable table of one report."""
  lines = [f"{report.topology}: {report.devices} × {report.device_kind} on {report.hosts} hosts, "
           f"mesh {report.mesh}; {report.params / 1e6:.1f}M parameters; global batch {report.batch_size} "
           f"({report.batch_size // (report.mesh['data'] * report.mesh['fsdp'])} per data-parallel device); "
           f"remat {report.remat}",
           f"  compile (train + eval)  {report.compile_seconds:10.1f} s"]
  if report.data_streams:
    lines.append(f"  THE TRAINER WOULD REFUSE THIS DATA LAYOUT: {report.data_streams}")
  if not report.fits_compiler:
    lines.append(f"  DOES NOT FIT: {report.error}")
    return "\n".join(lines)
  train = report.train
  for name, value in (("arguments", train.arguments), ("outputs", train.outputs),
                      ("  aliased (donated)", -train.aliased), ("temporaries", train.temporaries),
                      ("generated code", train.generated_code), ("train step total", train.total),
                      ("eval step + opt state", report.eval_total)):
    lines.append(f"  {name:<22} {value / GiB:10.3f} GiB")
  lines += [f"  per-chip peak          {report.total / GiB:10.3f} GiB = {report.fraction():.1%} of "
            f"{report.hbm_bytes / GiB:.0f} GiB HBM",
            f"  FLOPs/step (XLA)       {report.xla_flops:10.3e}   (loop bodies, e.g. scanned layers, counted once)",
            f"  FLOPs/step (analytic)  {report.analytic_flops:10.3e}",
            f"  step time at {mfu:.0%} MFU   {report.step_seconds(mfu) * 1e3:10.1f} ms "
            f"({report.peak_flops / 1e12:.0f} TFLOP/s per chip)"]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  from absl import flags  # noqa: PLC0415 (CLI only)
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  FLAGS = flags.FLAGS  # noqa: N806
  config = FLAGS.config
  if FLAGS.find_max_batch:
    best, reports = find_max_batch(config, FLAGS.topology, FLAGS.limit_fraction, FLAGS.max_batch)
    if best is None:
      print(f"not even {reports[0].batch_size} (one sample per data-parallel device) fits under "
            f"{FLAGS.limit_fraction:.0%} of HBM")
    else:
      print(f"\nlargest global batch under {FLAGS.limit_fraction:.0%} of HBM: {best.batch_size}\n")
      print(format_report(best, FLAGS.mfu))
    record = {"max_batch": best.batch_size if best else 0, "limit_fraction": FLAGS.limit_fraction,
              "cap": FLAGS.max_batch, "best": best.to_json(FLAGS.mfu) if best else None,
              "tried": [r.to_json(FLAGS.mfu) for r in reports]}
  else:
    report = compile_report(config, FLAGS.topology, FLAGS.batch_size)
    print(format_report(report, FLAGS.mfu))
    record = report.to_json(FLAGS.mfu)
  record.update(config=FLAGS["config"].config_filename, topology=FLAGS.topology, time=time.strftime("%FT%T%z"))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "a", encoding="utf-8") as f:
      f.write(json.dumps(record, default=str) + "\n")
  else:
    print(json.dumps(record, default=str))


def _define_flags() -> None:
  from absl import flags  # noqa: PLC0415 (CLI only)
  from ml_collections import config_flags  # noqa: PLC0415
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
  flags.DEFINE_enum("topology", "v4-64", list(TOPOLOGIES), "TPU slice to compile for.")
  flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's train.batch_size).")
  flags.DEFINE_bool("find_max_batch", False, "Search the largest global batch that fits under --limit_fraction.")
  flags.DEFINE_integer("max_batch", 4096, "Upper bound of the --find_max_batch search.")
  flags.DEFINE_float("limit_fraction", 0.9, "Fraction of HBM a step may use.")
  flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the implied step time.")
  flags.DEFINE_string("json_out", None, "Append the JSON record to this file (default: print it).")
  flags.mark_flags_as_required(["config"])
  # Checked before any compile: each takes a minute or more, and a bad value was found only after it (or ignored).
  flags.register_validator("batch_size", lambda value: value is None or value > 0, "--batch_size must be positive")
  flags.register_validator("max_batch", lambda value: value > 0, "--max_batch must be positive")
  for name in ("mfu", "limit_fraction"):
    flags.register_validator(name, lambda value: 0 < value <= 1, f"--{name} must be in (0, 1]")
  flags.register_validator("json_out", lambda value: value is None or (
      os.path.isdir(os.path.dirname(os.path.abspath(value))) and not os.path.isdir(value)),
      "--json_out must be a file in an existing directory")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  try:
    app.run(main)
  except (RuntimeError, ValueError) as error:
    sys.exit(f"error: {error}")
