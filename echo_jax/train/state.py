"""Train state and optimizer (DESIGN §4): AdamW, warmup-cosine schedule, weight-decay mask, gradient clipping.

The state holds float32 parameters, the optimizer state and `step` as a JAX array (a Python int would be a
compile-time constant and retrace the step every iteration).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec

from echo_jax.model import Echo, EchoConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken (skipped non-finite steps included)
  params: Any
  opt_state: Any


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup over `warmup_frac` of the steps to the peak, then cosine to zero at the last step."""
  warmup = max(1, int(train.warmup_frac * train.steps))
  return optax.warmup_cosine_decay_schedule(0.0, train.lr, warmup, max(train.steps, warmup + 1), 0.0)


def decay_mask(params: Any) -> Any:
  """True for the weights that get weight decay: matrices, except AdaLN and the output projection.

  Biases, norm scales, AdaLN (it sets the conditioning scale) and out_proj (zero-initialised on purpose) are not
  pulled towards zero.
  """

  def decays(path: tuple[Any, ...], leaf: jax.Array) -> bool:
    names = [str(getattr(part, "key", part)) for part in path]
    if names[-1] not in ("kernel", "embedding"):
      return False
    return not any("adaln" in name or name == "out_proj" for name in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2, weight_decay=train.weight_decay,
                      mask=decay_mask)
  if train.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)
  return adamw


def example_inputs(config: ml_collections.ConfigDict, batch: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one batch as the data pipeline produces it."""
  data, latent_dim = config.data, config.model.latent_dim
  return {
      "latent": jax.ShapeDtypeStruct((batch, data.max_frames, latent_dim), jnp.float32),
      "latent_mask": jax.ShapeDtypeStruct((batch, data.max_frames), jnp.bool_),
      "text": jax.ShapeDtypeStruct((batch, data.max_text_len), jnp.int32),
      "text_mask": jax.ShapeDtypeStruct((batch, data.max_text_len), jnp.bool_),
      "speaker": jax.ShapeDtypeStruct((batch, data.max_ref_frames, latent_dim), jnp.float32),
      "speaker_mask": jax.ShapeDtypeStruct((batch, data.max_ref_frames), jnp.bool_),
  }


def init_params(model: Echo, key: jax.Array, config: ml_collections.ConfigDict) -> Any:
  """Boxed (logically partitioned) parameters; small shapes suffice since no parameter depends on lengths."""
  cfg: EchoConfig = model.cfg
  frames = 4 * cfg.speaker_patch
  x = jnp.zeros((1, frames, cfg.latent_dim), jnp.float32)
  text = jnp.zeros((1, 8), jnp.int32)
  prefix = x if cfg.blockwise else None
  return model.init(key, x, jnp.zeros((1,)), text, text > -1, x, jnp.ones((1, frames), bool), prefix=prefix)["params"]


def create_train_state(model: Echo, key: jax.Array, config: ml_collections.ConfigDict) -> TrainState:
  """A fresh state with plain (unboxed) parameters; `abstract_train_state` gives their logical axes."""
  return _state_from_params(nn.unbox(init_params(model, key, config)), config)


def _state_from_params(params: Any, config: ml_collections.ConfigDict) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(config.train).init(params))


def abstract_train_state(model: Echo, config: ml_collections.ConfigDict) -> tuple[TrainState, TrainState]:
  """(shapes and dtypes of a fresh state, the logical PartitionSpec of each of its leaves), from one trace of the
  model's init; the optimizer moments follow their parameters."""
  boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0), config))
  abstract = jax.eval_shape(lambda params: _state_from_params(params, config), nn.unbox(boxed))
  param_specs = nn.get_partition_spec(boxed)
  opt_specs = optax.tree_map_params(
      make_optimizer(config.train), lambda _, spec: spec, abstract.opt_state, param_specs,
      transform_non_params=lambda _: PartitionSpec(), is_leaf=lambda x: isinstance(x, PartitionSpec))
  return abstract, TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs)


def count_params(params: Any) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(nn.unbox(params))))
