"""Device mesh, the logical-axis rules table, and the shardings of the train state and of batches (DESIGN §5).

Model parameters name their axes logically (`embed`, `mlp`, `heads`, ...); `LOGICAL_AXIS_RULES` is the one place
that says which mesh axis each name is sharded over. FSDP shards every large weight over `fsdp` along `embed`;
batches are sharded over (`data`, `fsdp`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from echo_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("layers", None),
    ("kv", None),
    ("heads_norm", None),
    ("norm", None),
    ("vocab", None),
    ("latent", None),
    ("patch", None),
    ("rank", None),
    ("cond", "fsdp"),
    ("timestep", None),
)


def mesh_shape(sizes: dict[str, int], device_count: int) -> tuple[int, ...]:
  """Resolves one `-1` in the mesh sizes to the remaining devices; checks the product."""
  shape = [sizes[axis] for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, shape, strict=True):
    if size != -1 and size < 1:  # 0 divided by zero further on
      raise ConfigError(f"config.mesh.{axis}={size}: a mesh axis is a positive number of devices, or -1 for the "
                        "devices the other axes leave")
  if shape.count(-1) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape, strict=True))}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if device_count % known:
      raise ConfigError(f"{device_count} devices cannot be split into a mesh with fixed axes of product {known}")
    shape[shape.index(-1)] = device_count // known
  if math.prod(shape) != device_count:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs {math.prod(shape)} devices, "
                      f"but {device_count} are available; fix config.mesh")
  return tuple(shape)


@contextlib.contextmanager
def activate(mesh: Mesh) -> Iterator[None]:
  """The mesh and logical-axis rules to trace a step under, so that `nn.with_logical_constraint` constrains the
  activations. (Flax finds the mesh through `jax.set_mesh`; the legacy `with mesh:` leaves every such constraint out.)
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  if devices[0].platform == "tpu":
    try:
      device_array = mesh_utils.create_device_mesh(shape, devices)
    except NotImplementedError as error:  # JAX's advice names an argument that no config field sets
      raise ConfigError(
          f"config.mesh {dict(zip(MESH_AXES, shape, strict=True))} does not fit the torus of these {len(devices)} "
          "TPU chips: each of data, fsdp and tensor must be a product of some of the slice's axis sizes (JAX: "
          f"{str(error).split('. If you want', 1)[0]}). Change config.mesh, e.g. --config.mesh.data=1 "
          "--config.mesh.tensor=1 (FSDP over every chip)") from error
  else:
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """Replicates a dimension that the mesh axis does not divide (small configs on many devices)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    names = (axes,) if isinstance(axes, str) else (axes or ())
    size = math.prod(mesh.shape[name] for name in names)
    fitted.append(axes if size and dim % size == 0 else None)
  return PartitionSpec(*fitted)


def logical_to_shardings(logical_specs: Any, abstract: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree, from its logical PartitionSpecs and its shapes."""
  mesh_specs = nn.logical_to_mesh(logical_specs, LOGICAL_AXIS_RULES)
  return jax.tree.map(lambda spec, leaf: NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh)),
                      mesh_specs, abstract, is_leaf=lambda x: isinstance(x, PartitionSpec))


def shardings_of(tree: Any) -> Any:
  """The `.sharding` of every leaf of a pytree of arrays or of ShapeDtypeStructs that carry one."""
  return jax.tree.map(lambda leaf: leaf.sharding, tree)


def bytes_per_device(tree: Any) -> int:
  """Bytes of one device's shards of the arrays (or ShapeDtypeStructs) in `tree`; a leaf without a sharding counts
  whole."""
  return sum(math.prod(leaf.shape if leaf.sharding is None else leaf.sharding.shard_shape(leaf.shape))
             * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over ('data', 'fsdp'); the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
  """Raises ConfigError unless `batch_size` is a positive multiple of the devices the batch is split over (data ×
  fsdp): JAX's own error for it names a sharding and tiling factors, not the config field to change."""
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size <= 0 or batch_size % data_parallel:
    raise ConfigError(f"batch size {batch_size} is not a positive multiple of the {data_parallel} data-parallel "
                      f"devices of mesh {dict(mesh.shape)} (data × fsdp): set --config.train.batch_size to a multiple "
                      f"of {data_parallel}, or give config.mesh fewer data or fsdp devices")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Builds global arrays from this process's slice of the batch (every process passes its own rows)."""
  return {
      name: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
      for name, value in local_batch.items()
  }
