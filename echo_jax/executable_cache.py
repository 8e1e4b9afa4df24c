"""Compiled steps kept beside JAX's persistent compilation cache, so that a warm launch skips tracing too.

JAX's persistent compilation cache (`runtime.enable_compilation_cache`) skips XLA's compile, but it is keyed by the
lowered program: every launch still traces and lowers the step first (about 1.5 s on a CPU host, for the demo and for
echo_1p3b alike, since the layers are scanned), and on a warm restart that is most of what is left. This cache is
keyed by what the program is made from instead: the echo_jax source, the config (but for the fields no step reads,
`config.HOST_ONLY_FIELDS`: a relaunch with other shards or checkpoint cadence still loads), the step's name and input
shapes, the mesh and every device, JAX's settings and the versions of JAX, XLA, libtpu and the other libraries that
shape the program. A launch that finds its key loads the executable (`jax.experimental.serialize_executable`, as
MaxText's AOT training does) in place of trace + lower + compile; anything else compiles and stores (except a step
that JAX's own cache answered: see `compile_cached`). Beside each executable it keeps the shapes and shardings of its
inputs (`load_inputs`), so that a restart can restore its state onto them while the executable loads.

It lives in `<compilation cache>/echo_executables/` and is on exactly when that cache is, so it shares its
exclusions (a CPU run over several devices never uses it). Loading an executable runs code from that directory:
keep it as private as the compilation cache itself.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import pickle
import threading
import types
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath
from jax.experimental import serialize_executable

from echo_jax.config import program_fields

SUBDIRECTORY = "echo_executables"
# XLA's memory analysis of a stored executable, kept with it (see `memory_analysis`).
_MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes")
_loaded_memory: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loaded executable -> its stored analysis
# Distributions whose version can change a compiled program: JAX, its TPU and GPU back ends, and what traces the
# model. Named, not found by scanning every installed distribution (that takes 0.2 s of a 3 s warm restart).
_LIBRARIES = ("jax", "jaxlib", "libtpu", "libtpu-nightly", "jax-cuda12-plugin", "jax-cuda12-pjrt",
              "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-rocm7-plugin", "jax-rocm7-pjrt", "flax", "optax", "numpy",
              "ml_dtypes")
# Environment variables that XLA and libtpu read when they compile.
_ENVIRONMENT = ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "TPU_ACCELERATOR_TYPE", "JAX_PLATFORMS")


def directory() -> epath.Path | None:
  """Where executables are kept: inside JAX's persistent compilation cache, or None while that cache is off."""
  cache = jax.config.jax_compilation_cache_dir
  return epath.Path(cache) / SUBDIRECTORY if cache and jax.config.jax_enable_compilation_cache else None


@functools.cache
def _source_digest() -> str:
  """SHA-256 of every Python file of the echo_jax package (path and content)."""
  root = os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for folder, subfolders, files in os.walk(root):
    subfolders.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(folder, name)
      digest.update(os.path.relpath(path, root).encode())
      with open(path, "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())
  return digest.hexdigest()


@functools.cache
def _library_versions() -> dict[str, str | None]:
  versions = {}
  for name in _LIBRARIES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def program_key(name: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, inputs: Any) -> str | None:
  """The cache key of step `name` of `config` compiled for `mesh` and `inputs` (a pytree of ShapeDtypeStructs,
  shardings included) on this process; None while the cache is off or when `mesh` is not made of this process's
  devices (an ahead-of-time compile for a TPU topology is never stored)."""
  if directory() is None or not set(mesh.devices.flat) <= set(jax.devices()):
    return None
  devices = [(d.id, d.process_index, d.platform, d.device_kind, str(getattr(d, "coords", "")))
             for d in jax.devices()]
  description = {
      "step": name,
      "source": _source_digest(),
      "config": program_fields(config),
      "inputs": str(jax.tree.map(lambda s: (s.shape, str(s.dtype), str(getattr(s, "sharding", None))), inputs)),
      "mesh": [list(mesh.axis_names), mesh.device_ids.tolist()],
      "devices": devices,
      "process": [jax.process_index(), jax.process_count()],
      "backend": jax.devices()[0].client.platform_version,
      "jax_config": {key: repr(value) for key, value in sorted(jax.config.values.items())},
      "environment": {key: os.environ.get(key) for key in _ENVIRONMENT},
      "libraries": _library_versions(),
  }
  return hashlib.sha256(json.dumps(description, sort_keys=True, default=repr).encode()).hexdigest()


def _paths(key: str) -> tuple[epath.Path, epath.Path] | None:
  """(the executable's file, its inputs' file) of `key`, or None while the cache is off."""
  folder = directory()
  return (folder / f"{key}.executable", folder / f"{key}.inputs") if folder else None


def load_inputs(key: str, mesh: jax.sharding.Mesh) -> Any | None:
  """The inputs that the program stored under `key` was compiled for (ShapeDtypeStructs, shardings on `mesh`), or
  None when none are stored there. Reads a small file only: callers need not wait for `load`. (The inputs are
  written before their executable; found without it, they are still the inputs of the program `key` names.)"""
  paths = _paths(key)
  if paths is None:
    return None
  try:
    treedef, leaves = pickle.loads(paths[1].read_bytes())
  except FileNotFoundError:
    return None
  except Exception as error:  # noqa: BLE001 — as in `load`
    logging.warning("inputs of compiled step %s could not be read (%s: %s)", paths[1], type(error).__name__, error)
    return None
  return treedef.unflatten([
      jax.ShapeDtypeStruct(shape, dtype, sharding=None if spec is None else jax.sharding.NamedSharding(mesh, spec))
      for shape, dtype, spec in leaves])


def load(key: str, mesh: jax.sharding.Mesh) -> jax.stages.Compiled | None:
  """The executable stored under `key`, loaded onto the devices of `mesh` in mesh order (the device assignment of a
  program whose shardings are on `mesh`), or None when there is none (or the cache is off). One that cannot be read
  or loaded is reported and treated as absent: the caller compiles and stores a good one over it. Loading runs
  without the GIL (other threads go on)."""
  paths = _paths(key)
  if paths is None:
    return None
  try:
    payload, in_tree, out_tree, memory = pickle.loads(paths[0].read_bytes())
    compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                         execution_devices=list(mesh.devices.flat))
    if memory is not None:
      _loaded_memory[compiled] = memory
    _mark_used(paths)
    return compiled
  except FileNotFoundError:  # nothing stored: one request to find out, not an `exists` and then a read
    return None
  except Exception as error:  # noqa: BLE001 — any failure to load means: compile instead
    logging.warning("compiled step %s could not be loaded (%s: %s); compiling it again", paths[0],
                    type(error).__name__, error)
    return None


def memory_analysis(compiled: jax.stages.Compiled) -> Any | None:
  """XLA's memory analysis of `compiled` (`Compiled.memory_analysis()`), or, for an executable loaded from this cache
  whose backend gives none for a loaded one, the analysis stored with it when it was compiled; None when neither is
  known. (Whether libtpu analyses a deserialized executable is not known here: with no analysis the launch's memory
  check would be skipped at every warm restart, a step refused at its cold launch included.)"""
  stats = compiled.memory_analysis()
  if stats is None and compiled in _loaded_memory:
    return types.SimpleNamespace(**_loaded_memory[compiled])
  return stats


def _mark_used(paths: tuple[epath.Path, ...]) -> None:
  """Sets the modification time of an entry's local files to now. The disk watchdog deletes entries unused for a
  week (`watchdog.COMPILE_CACHE_UNUSED_S`) and a read updates a file's access time at most once a day (`relatime`),
  or never (`noatime`): without this, an entry that every launch loads would count as unused a week after it was
  written, and its deletion would cost the next launch its compile. (A remote cache is not watched: left alone.)"""
  for path in paths:
    if "://" not in str(path):
      try:
        os.utime(path)
      except OSError as error:  # read-only, or deleted since: the entry was still loaded
        logging.info("could not mark %s used (%s)", path, error)


def _write(path: epath.Path, content: bytes) -> None:
  """Writes under a temporary name that then replaces any older file: a reader never sees half a file."""
  temporary = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex}"
  try:
    temporary.write_bytes(content)
    temporary.replace(path)
  finally:
    if temporary.exists():
      temporary.unlink()


def store(key: str, compiled: jax.stages.Compiled, inputs: Any) -> None:
  """Stores `compiled` and the `inputs` it was compiled for (see `program_key`) under `key`; a no-op while the cache
  is off. The inputs go first, so a stored executable always has them. A failure to write is reported, not raised:
  training goes on without the cache."""
  paths = _paths(key)
  if paths is None:
    return
  leaves, treedef = jax.tree.flatten(inputs)
  layout = [(tuple(leaf.shape), leaf.dtype, getattr(leaf.sharding, "spec", None)) for leaf in leaves]
  try:
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    _write(paths[1], pickle.dumps((treedef, layout)))
    stats = compiled.memory_analysis()
    memory = None if stats is None else {name: int(getattr(stats, name)) for name in _MEMORY_FIELDS}
    _write(paths[0], pickle.dumps((*serialize_executable.serialize(compiled), memory)))
  except Exception as error:  # noqa: BLE001 — the cache is an optimisation; a full disk must not stop training
    logging.warning("compiled step not stored in %s (%s: %s)", paths[0].parent, type(error).__name__, error)


def _compile(lower: Callable[[], jax.stages.Lowered]) -> tuple[jax.stages.Compiled, bool]:
  """(`lower().compile()`, whether XLA compiled it here: False when JAX's persistent cache answered)."""
  thread, answered = threading.get_ident(), []
  lowered = lower()  # outside the listening: lowering may run small programs of its own (a key from the seed)

  def listen(event: str, **_: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits" and threading.get_ident() == thread:
      answered.append(event)

  jax.monitoring.register_event_listener(listen)
  try:
    compiled = lowered.compile()
  finally:
    jax.monitoring.unregister_event_listener(listen)
  return compiled, not answered


def compile_cached(key: str | None, lower: Callable[[], jax.stages.Lowered], mesh: jax.sharding.Mesh,
                   inputs: Any) -> jax.stages.Compiled:
  """The executable stored under `key` (a `program_key`) loaded onto `mesh` (see `load`), else `lower().compile()`,
  then stored under `key` with `inputs` (the step's arguments as ShapeDtypeStructs with shardings, for
  `load_inputs`) if XLA compiled it in this process.

  An executable that JAX's persistent cache answered is not stored: XLA:CPU (jax 0.10.2) serialises such an
  executable without some of its functions, and one loaded back from that fails when it runs ("Function ... not
  found"). Such a step is traced again at each launch, as without this cache, until a launch compiles it itself (its
  program changed, or JAX's cache lost it).
  """
  compiled = load(key, mesh) if key else None
  if compiled is None:
    compiled, compiled_here = _compile(lower)
    if key and compiled_here:
      store(key, compiled, inputs)
  return compiled
