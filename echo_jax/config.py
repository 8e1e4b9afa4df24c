"""Defaults shared by every config file; a config in `configs/` starts from `base_config()` and changes a few fields.

Fields (override any from the command line, e.g. `--config.train.batch_size=8`):
  seed                  one seed for parameters, data order, timesteps, noise and CFG dropout
  model.*               `echo_jax.model.EchoConfig`
  data.train_shards     shard paths or globs, comma separated (local, gs://, hf://datasets/...)
  data.eval_shards      held-out shards for the eval loss ('' = no eval)
  data.pad_latent       .npy file (local or gs://) holding the codec's encoding of silence [D] ('' = zeros)
  data.streams          independent data streams G: stream g fills rows [g·B/G, (g+1)·B/G) of every batch
  train.*               batch size (global), steps, optimizer, CFG dropout, logging / eval / checkpoint cadence
  mesh.*                device mesh sizes: data × fsdp × tensor (-1 = all remaining devices)
  codec                 "mel" | "dacvae" | "none" | "fish_pca" (latents only: no codec here): the latents' codec
  samples.*             speech written to samples/step_N/ during training (needs a codec and eval shards)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from typing import Any

import ml_collections
from flax import traverse_util

from echo_jax import codecs, storage
from echo_jax.data.shards import MIN_REF_FRAMES
from echo_jax.errors import ConfigError
from echo_jax.model import EchoConfig


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compile_cache_dir = "~/.cache/echo_jax/xla"  # persistent XLA cache ("" = off); gs:// on a pod
  config.model = ml_collections.ConfigDict(dataclasses.asdict(EchoConfig()))

  config.data = ml_collections.ConfigDict()
  config.data.train_shards = ""
  config.data.eval_shards = ""
  config.data.pad_latent = ""
  config.data.max_text_len = 768
  config.data.max_frames = 640  # 25.6 s at 25 frames/s
  config.data.max_ref_frames = 256
  config.data.prefetch = 2  # batches built ahead per stream
  config.data.streams = 1  # data streams; a pod sets a multiple of the host count (the batch never depends on hosts)
  config.data.cache_dir = "~/.cache/echo_jax/shards"  # for remote (gs://, hf://) shards; "" = local shards only
  config.data.shard_prefetch = 2  # remote shards fetched ahead per stream
  config.data.stall_timeout = 120.0  # seconds without download progress before a retry
  # Attempts per shard. Eight ride out an outage of the store (a Hub rate-limit window, a GCS blip) of a minute or
  # two per shard (waits of about 1, 2, 4 ... 60 s); with three, a 40 s outage ran through 16 shards in a row and
  # stopped the run (found by review).
  config.data.download_retries = 8

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 256  # global, over all hosts
  config.train.steps = 100_000
  config.train.lr = 1e-4
  config.train.warmup_frac = 0.05
  config.train.b1 = 0.9
  config.train.b2 = 0.99
  config.train.weight_decay = 0.01
  config.train.grad_clip = 1.0  # global-norm clipping; 0 disables
  config.train.text_dropout = 0.1
  config.train.speaker_dropout = 0.1
  config.train.log_every = 10
  config.train.eval_every = 1000
  config.train.eval_batches = 4
  config.train.ckpt_every = 5000
  config.train.keep_checkpoints = 3  # the newest K
  config.train.keep_period = 0  # also keep every M-th step forever (0 = none)
  config.train.ckpt_compression = False  # zstd: ~8% smaller, restores 1.4-1.7x slower (echo_jax/checkpoint.py)
  # GB a restore holds read but not yet on the devices (raised to fit the largest array; 0 = Orbax's 96 GB). Alone on
  # an H200, echo_1p3b's 15.6 GB restored in 4.7-5.0 s with 4-8 and in 6.7-7.3 s unbounded (BENCHMARKS.md, Restart).
  config.train.ckpt_restore_gb = 8.0  # a float, so that a fraction can be given too
  # A restart restores its checkpoint while the train step compiles or loads (False: after it). On one H200 each slowed
  # the other down (BENCHMARKS.md, Restart); on a pod the restore reads gs:// meanwhile.
  config.train.restore_beside_compile = True
  config.train.max_nonfinite = 5  # consecutive non-finite steps before the run stops
  # Seconds without a finished step (a hung data read, collective or storage call) after which the run prints every
  # thread's stack and exits 1 (runtime.HangWatchdog), so launch.sh reports it; 0 = never.
  config.train.hang_timeout = 1800.0
  # Seconds a launch may take to reach its first step (listing, workdir checks, restore, compile, first shards); past
  # them it exits the same way: one host stuck there (a listing or a restore that never returns) holds every other
  # in a collective. Above the longest cold compile (echo_1p3b for a v4-64: 76 s on a CPU); 0 = never.
  config.train.setup_timeout = 3600.0
  config.train.cpu_peak_flops = 0.0  # per-device peak for MFU on CPU; 0 = measure a matmul at start

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1

  config.codec = "dacvae"  # "mel", "dacvae", "none" (tests) or "fish_pca" (no codec); how samples and inference
  # make audio
  config.codec_weights = ""  # converted DACVAE weights (.safetensors), for samples during training

  config.samples = ml_collections.ConfigDict()
  config.samples.every = 0  # write samples/step_N/ every N steps (0 = never)
  config.samples.count = 2  # held-out texts (with their references) spoken each time
  config.samples.steps = 16  # Euler steps
  return config


# The fields that no compiled step reads: the host's data, checkpoint, logging and sampling settings. A relaunch that
# changes only these (more steps between checkpoints, new shards) still loads its cached steps (executable_cache.py).
# tests/test_executable_cache.py lowers the steps with every one of them changed, and they must stay the same.
HOST_ONLY_FIELDS = (
    "codec", "codec_weights", "compile_cache_dir",
    "data.cache_dir", "data.download_retries", "data.eval_shards", "data.pad_latent", "data.prefetch",
    "data.shard_prefetch", "data.stall_timeout", "data.streams", "data.train_shards",
    "samples",
    "train.ckpt_compression", "train.ckpt_every", "train.ckpt_restore_gb", "train.cpu_peak_flops",
    "train.eval_batches", "train.eval_every", "train.keep_checkpoints", "train.keep_period", "train.log_every",
    "train.max_nonfinite", "train.restore_beside_compile", "train.hang_timeout", "train.setup_timeout",
)


def program_fields(config: ml_collections.ConfigDict) -> dict:
  """`config` as a dict without its HOST_ONLY_FIELDS: what the compiled steps are made from."""
  fields = config.to_dict()
  for name in HOST_ONLY_FIELDS:
    *parents, leaf = name.split(".")
    section = fields
    for parent in parents:
      section = section.get(parent, {})
    section.pop(leaf, None)
  return fields


@dataclasses.dataclass(frozen=True)
class Bound:
  """The interval a config number must lie in: from `least` to `most`, each end included unless it is `open_*`;
  `zero` says what 0 means where it is allowed and special."""

  least: float
  most: float = math.inf
  open_least: bool = False
  open_most: bool = False
  zero: str = ""

  def holds(self, value: float) -> bool:  # NaN holds no bound
    above = value > self.least if self.open_least else value >= self.least
    below = value < self.most if self.open_most else value <= self.most
    return above and below

  def __str__(self) -> str:
    if self.most == math.inf:
      return f"{'above' if self.open_least else 'at least'} {self.least:g}"
    return f"in {'(' if self.open_least else '['}{self.least:g}, {self.most:g}{')' if self.open_most else ']'}"


# The interval of each number a run reads. Outside it, a run failed only after its compile (a ZeroDivisionError for
# log_every=0, a data setting checked as the data opened), stopped with a false diagnosis (max_nonfinite=0), or
# trained wrongly without a word: a dropout of 10 dropped every text and speaker, b2=1 made the first update NaN
# (Adam's bias correction divides by 1 - b2) and saved it, warmup_frac=5 never reached the peak rate (found by review).
BOUNDS = {
    "seed": Bound(0),
    "data.max_text_len": Bound(2),  # the BOS byte and at least one of text
    "data.max_frames": Bound(1),
    "data.max_ref_frames": Bound(MIN_REF_FRAMES),
    "data.prefetch": Bound(0),
    "data.streams": Bound(1),
    "data.shard_prefetch": Bound(0),
    "data.stall_timeout": Bound(0, open_least=True),
    "data.download_retries": Bound(1),
    "train.batch_size": Bound(1),
    "train.steps": Bound(1),
    "train.lr": Bound(0, open_least=True, open_most=True),
    "train.warmup_frac": Bound(0, 1),
    "train.b1": Bound(0, 1, open_most=True),
    "train.b2": Bound(0, 1, open_most=True),
    "train.weight_decay": Bound(0),
    "train.grad_clip": Bound(0, zero="0 turns clipping off"),
    "train.text_dropout": Bound(0, 1),
    "train.speaker_dropout": Bound(0, 1),
    "train.log_every": Bound(1),
    "train.eval_every": Bound(0, zero="0 turns it off"),
    "train.eval_batches": Bound(0, zero="0 turns it off"),
    "train.ckpt_every": Bound(1),
    "train.keep_checkpoints": Bound(1),
    "train.keep_period": Bound(0, zero="0 turns it off"),
    "train.ckpt_restore_gb": Bound(0, zero="0 is Orbax's 96 GB"),
    "train.max_nonfinite": Bound(1),
    "train.hang_timeout": Bound(0, zero="0 turns it off"),
    "train.setup_timeout": Bound(0, zero="0 turns it off"),
    "train.cpu_peak_flops": Bound(0, zero="0 measures it"),
    "samples.every": Bound(0, zero="0 turns it off"),
    "samples.count": Bound(1),
    "samples.steps": Bound(1),
}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field outside its `BOUNDS`, a data.max_ref_frames the speaker patches do not
  divide, no training shards, a codec that no code speaks, a shard cache that is not local, or a model the model
  refuses (config.model.*): each trained on, or failed only after the compile, before (a negative lr ran the loss up
  to thousands, an unknown codec failed only at the first sample or at inference)."""
  for name, bound in BOUNDS.items():
    value = config
    for part in name.split("."):
      value = value[part]
    if not bound.holds(value):
      raise ConfigError(f"config.{name} must be {bound}, got {value}: give --config.{name} a value {bound}"
                       + (f" ({bound.zero})" if bound.zero else ""))
  if config.data.max_ref_frames % MIN_REF_FRAMES:
    raise ConfigError(f"config.data.max_ref_frames={config.data.max_ref_frames} is not a multiple of "
                      f"{MIN_REF_FRAMES}, the frames of a speaker patch")
  if not config.data.train_shards.strip():
    raise ConfigError("config.data.train_shards is empty: give the training shards, e.g. "
                      "--config.data.train_shards='data/demo/train-*.tar' (a glob, a gs:// glob or "
                      "hf://datasets/ORG/NAME/...; make the demo's with `make demo-data`)")
  if config.codec not in codecs.NAMES:
    raise ConfigError(f"config.codec={config.codec!r} is not one of {', '.join(codecs.NAMES)}")
  if config.data.cache_dir and not storage.is_local(config.data.cache_dir):
    # Joined as a local path, gs://b/c made a directory ./gs:/b/c and filled it.
    raise ConfigError(f"config.data.cache_dir={config.data.cache_dir!r} is not on this machine: the shard cache is a "
                      "local disk that downloads go to (each host's own); give a local directory")
  try:
    model_config(config)  # the model's own checks (sizes, heads, remat, dtype)
  except ValueError as error:  # its messages begin with the field
    raise ConfigError(f"config.model.{error}") from error


def model_config(config: ml_collections.ConfigDict) -> EchoConfig:
  return EchoConfig(**config.model.to_dict())


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (configs/*.py)."""
  spec = importlib.util.spec_from_file_location("echo_config", path)
  if spec is None or spec.loader is None or not os.path.isfile(path):
    raise ValueError(f"config file {path} does not exist or is not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_config_json(config: ml_collections.ConfigDict, directory: str) -> None:
  """DIRECTORY/config.json (local or gs://), never half-written (`storage.write_bytes`)."""
  storage.write_bytes(storage.join(directory, "config.json"),
                      config.to_json_best_effort(indent=2, sort_keys=True).encode("utf-8"))


def config_changes(config: ml_collections.ConfigDict, directory: str) -> dict[str, list]:
  """The fields of `config` whose value differs from DIRECTORY/config.json (the config of the run's last launch),
  as {"train.steps": [before, now]}; a field one of them lacks is null there. Empty when there is no config.json.
  A relaunch overwrites config.json, so the trainer records these in its events: the run log keeps every launch's
  changes, e.g. which steps ran with which learning rate."""
  try:
    record = json.loads(storage.read_bytes(storage.join(directory, "config.json")))
    if not isinstance(record, dict):
      raise ValueError(f"a JSON {type(record).__name__}, not an object")
  except FileNotFoundError:
    return {}
  except ValueError as error:  # not a config: the record is damaged, and the new launch's config replaces it
    return {"config.json": [f"unreadable ({error})", "rewritten"]}
  before, now = (traverse_util.flatten_dict(tree, sep=".")
                 for tree in (record, json.loads(config.to_json_best_effort())))
  return {key: [before.get(key), now.get(key)] for key in sorted(before.keys() | now.keys())
          if not _same(before.get(key), now.get(key))}


def _same(a: Any, b: Any) -> bool:
  return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))

