"""Flow matching (DESIGN §4): timesteps, noising, the velocity loss and CFG condition dropout.

Convention: x_t = (1 − t)·x0 + t·ε, so t = 1 is pure noise and the target velocity is v = ε − x0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EVAL_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)


def stratified_logit_normal(key: jax.Array, batch: int) -> jax.Array:
  """t [batch]: one uniform u and one random roll r per batch; q_i = ((i + r) mod B + u) / B, t_i = σ(Φ⁻¹(q_i)).

  Every stratum of the logit-normal is hit once per (global) batch, which lowers the variance of the loss.
  """
  u_key, roll_key = jax.random.split(key)
  u = jax.random.uniform(u_key, (), jnp.float32)
  roll = jax.random.randint(roll_key, (), 0, batch)
  q = ((jnp.arange(batch) + roll) % batch + u) / batch
  return jax.nn.sigmoid(jax.scipy.special.ndtri(q))


def noise(x0: jax.Array, t: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x_t, v): the noisy latents [B, T, D] at times t [B] and the target velocity."""
  t = t[:, None, None]
  return (1.0 - t) * x0 + t * eps, eps - x0


def velocity_loss(v_pred: jax.Array, v_target: jax.Array, latent_mask: jax.Array) -> jax.Array:
  """Squared error over all frames, padding included (the model must learn to emit the pad latent after speech),
  averaged and divided by the fraction of valid frames, so the scale does not depend on how much is padding."""
  squared = jnp.mean(jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32)))
  valid_fraction = jnp.maximum(jnp.mean(latent_mask.astype(jnp.float32)), 1e-6)
  return squared / valid_fraction


def cfg_dropout(key: jax.Array, batch: dict[str, jax.Array], text_rate: float,
                speaker_rate: float) -> dict[str, jax.Array]:
  """Drops the text (mask zeroed) and the speaker (latent and mask zeroed) of each sample independently."""
  text_key, speaker_key = jax.random.split(key)
  size = batch["text"].shape[0]
  keep_text = jax.random.uniform(text_key, (size,)) >= text_rate
  keep_speaker = jax.random.uniform(speaker_key, (size,)) >= speaker_rate
  return {
      **batch,
      "text_mask": batch["text_mask"] & keep_text[:, None],
      "speaker": batch["speaker"] * keep_speaker[:, None, None].astype(batch["speaker"].dtype),
      "speaker_mask": batch["speaker_mask"] & keep_speaker[:, None],
  }
