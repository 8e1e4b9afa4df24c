"""The jitted train and eval steps, compiled ahead of time with explicit shardings (DESIGN §4–§5).

`StepFunctions.compile` lowers both steps once for the exact batch shapes; the loop then calls the compiled
executables, so a shape or dtype change raises instead of silently recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from echo_jax import executable_cache, flow, sharding
from echo_jax.background import InBackground
from echo_jax.model import Echo
from echo_jax.train.state import TrainState, abstract_train_state, learning_rate_schedule, make_optimizer

Batch = dict[str, jax.Array]


def apply_model(model: Echo, params: Any, x_t: jax.Array, t: jax.Array, batch: Batch) -> jax.Array:
  return model.apply({"params": params}, x_t, t, batch["text"], batch["text_mask"], batch["speaker"],
                     batch["speaker_mask"])


def train_step(state: TrainState, batch: Batch, *, model: Echo, config: ml_collections.ConfigDict,
               base_key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on a global batch. A non-finite loss or gradient norm leaves params and optimizer unchanged.

  The update itself is not checked: from finite gradients it is finite whenever b1 and b2 are below 1 and the rate is
  finite, which `config.check_config` requires (b2=1 made the first update NaN; found by review). Checking it cost a
  reduction over every parameter per step (+4.7% bytes accessed by the demo's step)."""
  train = config.train
  key = jax.random.fold_in(base_key, state.step)
  t_key, noise_key, dropout_key = jax.random.split(key, 3)
  batch = flow.cfg_dropout(dropout_key, batch, train.text_dropout, train.speaker_dropout)
  x0 = batch["latent"]  # [B, T, D]
  t = flow.stratified_logit_normal(t_key, x0.shape[0])  # stratified over the global batch
  x_t, v_target = flow.noise(x0, t, jax.random.normal(noise_key, x0.shape, x0.dtype))

  def loss_fn(params: Any) -> jax.Array:
    return flow.velocity_loss(apply_model(model, params, x_t, t, batch), v_target, batch["latent_mask"])

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = make_optimizer(train).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(step=state.step + 1, params=keep_if_finite(params, state.params),
                         opt_state=keep_if_finite(opt_state, state.opt_state))
  metrics = {"loss": loss, "grad_norm": grad_norm, "lr": learning_rate_schedule(train)(state.step),
             "finite": finite}
  return new_state, metrics


def eval_step(params: Any, batch: Batch, key: jax.Array, *, model: Echo) -> dict[str, jax.Array]:
  """Loss at each fixed timestep of `flow.EVAL_TIMESTEPS`, with fixed noise and no condition dropout."""
  x0 = batch["latent"]
  eps = jax.random.normal(key, x0.shape, x0.dtype)
  losses = {}
  for value in flow.EVAL_TIMESTEPS:
    t = jnp.full((x0.shape[0],), value, jnp.float32)
    x_t, v_target = flow.noise(x0, t, eps)
    losses[f"eval_loss_t{value}"] = flow.velocity_loss(apply_model(model, params, x_t, t, batch), v_target,
                                                       batch["latent_mask"])
  losses["eval_loss"] = jnp.mean(jnp.stack(list(losses.values())))
  return losses


def sharded_abstract_state(model: Echo, config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
  """The train state as ShapeDtypeStructs carrying their shardings on `mesh`: what the steps are compiled for and what
  a checkpoint is restored into."""
  abstract_state, specs = abstract_train_state(model, config)
  shardings = sharding.logical_to_shardings(specs, abstract_state, mesh)
  return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract_state,
                      shardings)


def _batch_shardings(mesh: Mesh, batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.sharding.Sharding]:
  return {name: sharding.batch_sharding(mesh, len(s.shape)) for name, s in batch_shapes.items()}


def lower_train_step(model: Echo, config: ml_collections.ConfigDict, mesh: Mesh, abstract_state: TrainState,
                     batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> jax.stages.Lowered:
  """The train step lowered for `abstract_state` (`sharded_abstract_state`) and the batch `batch_shapes` on `mesh`
  (traced under `sharding.activate`); its state argument is donated."""
  state_shardings = sharding.shardings_of(abstract_state)
  base_key = jax.random.key(config.seed)  # made outside the mesh, which may be a TPU topology's (aot.py)
  with sharding.activate(mesh):
    return jax.jit(
        functools.partial(train_step, model=model, config=config, base_key=base_key),
        in_shardings=(state_shardings, _batch_shardings(mesh, batch_shapes)),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0,
    ).lower(abstract_state, batch_shapes)


def lower_eval_step(model: Echo, mesh: Mesh, abstract_state: TrainState,
                    batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> jax.stages.Lowered:
  """The eval step lowered as `lower_train_step` is (params, batch, key)."""
  replicated = sharding.replicated(mesh)
  with sharding.activate(mesh):
    return jax.jit(
        functools.partial(eval_step, model=model),
        in_shardings=(sharding.shardings_of(abstract_state).params, _batch_shardings(mesh, batch_shapes), replicated),
        out_shardings=replicated,
    ).lower(abstract_state.params, batch_shapes, jax.eval_shape(lambda: jax.random.key(0)))


def _program_key(name: str, config: ml_collections.ConfigDict, mesh: Mesh,
                 batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> str | None:
  """The step's `executable_cache` key. The state's shapes and shardings are not in it: the source, the config and the
  mesh in the key determine them, and leaving them out lets `StepFunctions.cached_abstract_state` find them without
  tracing."""
  return executable_cache.program_key(name, config, mesh, batch_shapes)


@dataclasses.dataclass
class StepFunctions:
  """The compiled train / eval steps and the shardings they were compiled for."""

  train: Any
  abstract_state: TrainState  # shapes, dtypes and shardings of the state (`sharded_abstract_state`)
  mesh: Mesh
  train_flops: float  # XLA's count for one train step of this process's program
  lower_eval: Callable[[], jax.stages.Lowered] = dataclasses.field(repr=False)
  eval_key: str | None = None  # the eval step's `executable_cache.program_key`
  eval: Any = None  # set by `compile_eval`
  _eval_compiling: InBackground | None = dataclasses.field(default=None, repr=False)

  @classmethod
  def compile(cls, model: Echo, config: ml_collections.ConfigDict, mesh: Mesh,
              batch_shapes: dict[str, jax.ShapeDtypeStruct], *, evaluate: bool = True,
              abstract_state: TrainState | None = None) -> StepFunctions:
    """Compiles the train step, and the eval step too unless `evaluate` is False (see `compile_eval`), for
    `abstract_state` (`sharded_abstract_state` or `cached_abstract_state`; derived here when not given). While JAX's
    compilation cache is on, each compiled step is stored in the `executable_cache`, and a step stored before is
    loaded instead, untraced."""
    if abstract_state is None:
      abstract_state = sharded_abstract_state(model, config, mesh)
    lower_eval = functools.partial(lower_eval_step, model, mesh, abstract_state, batch_shapes)
    lower_train = functools.partial(lower_train_step, model, config, mesh, abstract_state, batch_shapes)
    train = executable_cache.compile_cached(_program_key("train", config, mesh, batch_shapes), lower_train, mesh,
                                            (abstract_state, batch_shapes))
    cost = train.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    steps = cls(train=train, abstract_state=abstract_state, mesh=mesh,
                train_flops=float((cost or {}).get("flops", 0.0)), lower_eval=lower_eval,
                eval_key=_program_key("eval", config, mesh, batch_shapes))
    if evaluate:
      steps.compile_eval()
    return steps

  @staticmethod
  def cached_abstract_state(config: ml_collections.ConfigDict, mesh: Mesh,
                            batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> TrainState | None:
    """The state's shapes and shardings stored with a train step that `compile` will load from the
    `executable_cache`, untraced and without waiting for that load; None when no such step is stored."""
    key = _program_key("train", config, mesh, batch_shapes)
    inputs = executable_cache.load_inputs(key, mesh) if key else None
    return None if inputs is None else inputs[0]

  @property
  def state_shardings(self) -> TrainState:
    return sharding.shardings_of(self.abstract_state)

  def compile_eval(self) -> Any:
    """Compiles the eval step (callable from a background thread: the mesh and rules it traces under are
    thread-local)."""
    self.eval = executable_cache.compile_cached(self.eval_key, self.lower_eval, self.mesh, self.abstract_state.params)
    return self.eval

  def compile_eval_in_background(self) -> None:
    """Starts compiling the eval step in a thread, unless it is compiled or compiling; `eval_step` waits for it."""
    if self.eval is None and self._eval_compiling is None:
      self._eval_compiling = InBackground("compile_eval", self.compile_eval)
      self._eval_compiling.start()

  @property
  def eval_ready(self) -> bool:
    """Whether `eval_step` would return without waiting (compiled, or its background compilation has ended)."""
    return self.eval is not None or (self._eval_compiling is not None and self._eval_compiling.done())

  def eval_step(self) -> Any:
    """The compiled eval step: compiled now, or when a background compilation runs, once it has finished."""
    if self._eval_compiling is not None:
      return self._eval_compiling.result()
    return self.eval or self.compile_eval()
