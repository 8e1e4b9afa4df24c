"""Building blocks of Echo: norms, rotary embeddings, attention, SwiGLU and low-rank AdaLN (DESIGN §3).

Every parameter carries logical axis names; `echo_jax.sharding.LOGICAL_AXIS_RULES` maps them to mesh axes.
Parameters are float32; activations run in `dtype` (bfloat16 on TPU); norms and softmax always run in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's default Linear init (kaiming-uniform with a=sqrt(5)), so a fresh model matches an upstream fresh model.
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    name: str,
    dtype: Dtype,
    use_bias: bool = False,
    zero_init: bool = False,
) -> nn.Dense:
  """A Linear layer whose kernel [in, out] and bias [out] carry the logical axis names `axes`."""
  kernel_init = nn.initializers.zeros_init() if zero_init else TORCH_LINEAR_INIT
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      name=name,
  )


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, computed in float32."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learned scale of shape `shape` (the trailing axes of the input)."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones_init(), self.axes), self.shape)
    return (rms_normalize(x, self.eps) * weight).astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin [..., T, head_dim // 2] for integer positions [..., T]."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, hd] by the angles cos/sin [B or 1, T, hd/2]."""
  x32 = x.astype(jnp.float32)
  even, odd = x32[..., 0::2], x32[..., 1::2]  # [B, T, H, hd/2]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def apply_rope_to_heads(x: jax.Array, cos: jax.Array, sin: jax.Array, n_rotated: int) -> jax.Array:
  """RoPE on the first `n_rotated` heads of x [B, T, H, hd]; the other heads are position-free."""
  if n_rotated == x.shape[2]:
    return apply_rope(x, cos, sin)
  return jnp.concatenate([apply_rope(x[:, :, :n_rotated], cos, sin), x[:, :, n_rotated:]], axis=2)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention. q [B, Tq, H, hd], k/v [B, Tk, H, hd], mask [B, Tq or 1, Tk] (True = visible).

  The softmax runs in float32. A fully masked row (a text dropped for CFG) yields a finite average instead of NaN;
  its consumers mask it out again.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class SwiGLU(nn.Module):
  """w2(silu(w1 x) * w3 x), no biases."""

  dim: int
  hidden: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gate = dense(self.hidden, ("embed", "mlp"), name="w1", dtype=self.dtype)(x)
    up = dense(self.hidden, ("embed", "mlp"), name="w3", dtype=self.dtype)(x)
    return dense(self.dim, ("mlp", "embed"), name="w2", dtype=self.dtype)(nn.silu(gate) * up)


class SelfAttention(nn.Module):
  """Encoder attention: per-head q/k RMSNorm, interleaved RoPE on all heads, sigmoid-gated output."""

  dim: int
  heads: int
  rope_theta: float
  eps: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    batch, length, _ = x.shape
    head_dim = self.dim // self.heads
    split = lambda y: y.reshape(batch, length, self.heads, head_dim)
    q = split(dense(self.dim, ("embed", "heads"), name="wq", dtype=self.dtype)(x))
    k = split(dense(self.dim, ("embed", "heads"), name="wk", dtype=self.dtype)(x))
    v = split(dense(self.dim, ("embed", "heads"), name="wv", dtype=self.dtype)(x))
    q = RMSNorm((self.heads, head_dim), ("heads_norm", "kv"), self.eps, name="q_norm")(q)
    k = RMSNorm((self.heads, head_dim), ("heads_norm", "kv"), self.eps, name="k_norm")(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attention(q, k, v, mask).reshape(batch, length, self.dim)
    out = out * jax.nn.sigmoid(dense(self.dim, ("embed", "heads"), name="gate", dtype=self.dtype)(x))
    return dense(self.dim, ("heads", "embed"), name="wo", dtype=self.dtype)(out)


class LowRankAdaLN(nn.Module):
  """Adaptive RMSNorm from the shared condition: each of shift/scale/gate gets a rank-r residual correction.

  c' = up(down(silu(c))) + c, `up` zero-initialised so a fresh model uses the shared condition unchanged.
  Returns the modulated input and the tanh gate.
  """

  dim: int
  rank: int
  eps: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> tuple[jax.Array, jax.Array]:
    # x [B, T, D]; cond [B, 3D] = shift | scale | gate.
    adapted = []
    for name, c in zip(("shift", "scale", "gate"), jnp.split(cond, 3, axis=-1), strict=True):
      low = dense(self.rank, ("embed", "rank"), name=f"{name}_down", dtype=self.dtype)(nn.silu(c))
      up = dense(self.dim, ("rank", "embed"), name=f"{name}_up", dtype=self.dtype, use_bias=True, zero_init=True)
      adapted.append((up(low) + c)[:, None, :])  # [B, 1, D]
    shift, scale, gate = adapted
    h = rms_normalize(x, self.eps) * (1.0 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
    return h.astype(x.dtype), jnp.tanh(gate)
