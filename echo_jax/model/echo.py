"""Echo: a flow-matching Diffusion Transformer for text-to-speech with speaker-reference conditioning (DESIGN §3).

Notation: B batch, T latent frames, D latent dim, L text bytes, S speaker patches (reference frames / 4),
P prefix patches (blockwise only), H heads, hd head dim, N decoder layers.

    text bytes ──► TextEncoder ──► text_norm ───────┐
    reference  ──► PatchedEncoder ─► speaker_norm ──┼─► ContextKV (per-layer K/V, computed once) ─┐
    [prefix    ──► PatchedEncoder ─► latent_norm] ──┘                                              │
    x_t, t ──► in_proj, timestep condition ──► N × DecoderBlock (joint self/context attention) ◄────┘
           ──► out_norm ──► out_proj ──► velocity v [B, T, D]

`encode_context` and `decode` are separate methods so the sampler computes the context once per generation.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from echo_jax.model.layers import (
    LowRankAdaLN,
    RMSNorm,
    SelfAttention,
    SwiGLU,
    apply_rope_to_heads,
    attention,
    dense,
    rope_angles,
)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Held while the model runs in Python, i.e. while it is traced. Flax creates Module classes during a trace (each
# nn.scan and nn.remat call in `scan_layers`), and creating one edits its base classes' dataclass fields in place
# (flax.linen.kw_only_dataclasses) while another thread's trace may be iterating them: "dictionary changed size during
# iteration". The trainer traces the train step, the state's initialisation and the eval step in threads of their
# own, and the sample hook traces the sampler beside the eval step's compile. Tracing holds the GIL anyway, so the
# lock costs no parallelism; XLA's compilation, which runs after the trace, does not take it.
_TRACING = threading.RLock()


@dataclasses.dataclass(frozen=True)
class EchoConfig:
  """Model hyper-parameters; `configs/*.py` fill `config.model` with these fields."""

  latent_dim: int = 128
  dim: int = 1536
  layers: int = 24
  heads: int = 12
  mlp_dim: int = 4096
  text_vocab: int = 256
  text_dim: int = 1024
  text_layers: int = 10
  text_heads: int = 8
  text_mlp_dim: int = 2816
  speaker_dim: int = 1024
  speaker_layers: int = 10
  speaker_heads: int = 8
  speaker_mlp_dim: int = 2816
  speaker_patch: int = 4
  timestep_dim: int = 512
  adaln_rank: int = 256
  rope_theta: float = 1e4
  norm_eps: float = 1e-5
  blockwise: bool = False  # adds the latent-prefix encoder and per-layer wk_latent / wv_latent
  dtype: str = "float32"  # activation dtype; parameters are always float32
  remat: str = "none"  # one of REMAT_POLICIES

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:  # NaN fails too
        raise ValueError(f"{field.name}={value} must be positive")  # 0 failed deep in Flax, dividing by zero
    for name, dim, heads in (("", self.dim, self.heads), ("text_", self.text_dim, self.text_heads),
                             ("speaker_", self.speaker_dim, self.speaker_heads)):
      if dim % heads or (dim // heads) % 2:
        raise ValueError(f"{name}dim={dim} must split into {name}heads={heads} heads of even size")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    if self.dtype not in ("float32", "bfloat16"):  # float16 would need loss scaling, which the train step has not
      raise ValueError(f"dtype={self.dtype!r} is not float32 or bfloat16")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


def scan_layers(block: type[nn.Module], cfg: EchoConfig, length: int, in_axes: tuple, name: str, **kwargs) -> Any:
  """`length` copies of `block` as one scanned module (flat compile time in depth), rematerialised per config."""
  policy = REMAT_POLICIES[cfg.remat]
  if policy is not None:
    block = nn.remat(block, policy=policy, prevent_cse=False)
  return nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=in_axes,
      length=length,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )(cfg=cfg, name=name, **kwargs)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block of the text and speaker encoders."""

  cfg: EchoConfig
  dim: int
  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, None]:
    cfg = self.cfg
    attn = SelfAttention(self.dim, self.heads, cfg.rope_theta, cfg.norm_eps, cfg.compute_dtype, name="attention")
    x = x + attn(RMSNorm((self.dim,), ("norm",), cfg.norm_eps, name="attention_norm")(x), mask, cos, sin)
    mlp = SwiGLU(self.dim, self.mlp_dim, cfg.compute_dtype, name="mlp")
    x = x + mlp(RMSNorm((self.dim,), ("norm",), cfg.norm_eps, name="mlp_norm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), None


class TextEncoder(nn.Module):
  """UTF-8 bytes [B, L] (BOS first) -> [B, L, text_dim]; bidirectional attention over the valid bytes."""

  cfg: EchoConfig

  @nn.compact
  def __call__(self, text: jax.Array, text_mask: jax.Array) -> jax.Array:
    cfg = self.cfg
    embed = nn.Embed(
        cfg.text_vocab, cfg.text_dim, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        name="text_embedding")
    x = embed(text)  # [B, L, text_dim]
    head_dim = cfg.text_dim // cfg.text_heads
    cos, sin = rope_angles(jnp.arange(text.shape[1])[None], head_dim, cfg.rope_theta)
    blocks = scan_layers(EncoderBlock, cfg, cfg.text_layers, (nn.broadcast,) * 3, "blocks",
                         dim=cfg.text_dim, heads=cfg.text_heads, mlp_dim=cfg.text_mlp_dim)
    x, _ = blocks(x, text_mask[:, None, :], cos, sin)
    return x


class PatchedEncoder(nn.Module):
  """Latents [B, T, D] -> [B, T/patch, speaker_dim]: patching, in_proj ÷ 6, causal blocks (speaker / prefix)."""

  cfg: EchoConfig

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    cfg = self.cfg
    batch, frames, latent_dim = latents.shape
    if frames % cfg.speaker_patch:
      raise ValueError(f"reference of {frames} frames is not a multiple of the patch size {cfg.speaker_patch}")
    patches = latents.reshape(batch, frames // cfg.speaker_patch, cfg.speaker_patch * latent_dim)
    x = dense(cfg.speaker_dim, ("patch", "embed"), name="in_proj", dtype=cfg.compute_dtype, use_bias=True)(
        patches.astype(cfg.compute_dtype)) / 6.0  # [B, S, speaker_dim]
    length = x.shape[1]
    head_dim = cfg.speaker_dim // cfg.speaker_heads
    cos, sin = rope_angles(jnp.arange(length)[None], head_dim, cfg.rope_theta)
    causal = jnp.tril(jnp.ones((1, length, length), bool))  # padding sits at the end, so causality hides it
    blocks = scan_layers(EncoderBlock, cfg, cfg.speaker_layers, (nn.broadcast,) * 3, "blocks",
                         dim=cfg.speaker_dim, heads=cfg.speaker_heads, mlp_dim=cfg.speaker_mlp_dim)
    x, _ = blocks(x, causal, cos, sin)
    return x


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """[cos(t·f), sin(t·f)] with f_k = 1000·exp(−ln(1e4)·k/half): t [B] in [0, 1] -> [B, dim]."""
  half = dim // 2
  freqs = 1000.0 * jnp.exp(-math.log(1e4) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[:, None] * freqs
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepCondition(nn.Module):
  """t [B] -> shift | scale | gate [B, 3·dim], shared by every decoder block (Linear-SiLU-Linear-SiLU-Linear)."""

  cfg: EchoConfig

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    cfg = self.cfg
    h = timestep_embedding(t, cfg.timestep_dim).astype(cfg.compute_dtype)
    h = nn.silu(dense(cfg.dim, ("timestep", "embed"), name="linear_0", dtype=cfg.compute_dtype)(h))
    h = nn.silu(dense(cfg.dim, ("embed", "mlp"), name="linear_1", dtype=cfg.compute_dtype)(h))
    return dense(3 * cfg.dim, ("mlp", "cond"), name="linear_2", dtype=cfg.compute_dtype)(h)


class ContextKV(nn.Module):
  """One decoder layer's K/V projections of the context (text, speaker and, blockwise, the latent prefix).

  Scanned over layers beside the decoder blocks; its output does not depend on x_t or t, so the sampler runs it
  once per generation. Keys are returned before `k_norm`, which the decoder block applies (it is shared with the
  self keys).
  """

  cfg: EchoConfig

  @nn.compact
  def __call__(self, carry: None, text_state: jax.Array, speaker_state: jax.Array,
               prefix_state: jax.Array | None) -> tuple[None, dict[str, jax.Array]]:
    cfg = self.cfg
    heads, head_dim = cfg.heads, cfg.dim // cfg.heads

    def project(name: str, state: jax.Array) -> jax.Array:
      y = dense(cfg.dim, ("embed", "heads"), name=name, dtype=cfg.compute_dtype)(state)
      return y.reshape(*state.shape[:2], heads, head_dim)  # [B, S, H, hd]

    kv = {
        "text_k": project("wk_text", text_state), "text_v": project("wv_text", text_state),
        "speaker_k": project("wk_speaker", speaker_state), "speaker_v": project("wv_speaker", speaker_state),
    }
    if prefix_state is not None:
      kv["latent_k"] = project("wk_latent", prefix_state)
      kv["latent_v"] = project("wv_latent", prefix_state)
    return carry, kv


@flax.struct.dataclass
class DecoderInputs:
  """Everything a decoder block needs besides x that is the same for every layer."""

  cond: jax.Array  # [B, 3·dim]
  cos: jax.Array  # [B or 1, T, hd/2] RoPE of the query / self-key positions
  sin: jax.Array
  text_mask: jax.Array  # [B, L]
  speaker_mask: jax.Array  # [B, S]
  latent_mask: jax.Array | None = None  # [B, P] prefix patches visible to every query
  latent_cos: jax.Array | None = None  # [1, P, hd/2] RoPE of the prefix keys at frames 4p
  latent_sin: jax.Array | None = None


class JointAttention(nn.Module):
  """Queries of x attend over [self, (latent prefix), text, speaker] keys; sigmoid-gated output."""

  cfg: EchoConfig

  @nn.compact
  def __call__(self, h: jax.Array, context: dict[str, jax.Array], speaker_kv_scale: jax.Array,
               inputs: DecoderInputs) -> jax.Array:
    cfg = self.cfg
    batch, frames, _ = h.shape
    heads, head_dim = cfg.heads, cfg.dim // cfg.heads
    rotated_heads = heads // 2
    split = lambda y: y.reshape(batch, frames, heads, head_dim)
    q = split(dense(cfg.dim, ("embed", "heads"), name="wq", dtype=cfg.compute_dtype)(h))
    k = split(dense(cfg.dim, ("embed", "heads"), name="wk", dtype=cfg.compute_dtype)(h))
    v = split(dense(cfg.dim, ("embed", "heads"), name="wv", dtype=cfg.compute_dtype)(h))
    q_norm = RMSNorm((heads, head_dim), ("heads_norm", "kv"), cfg.norm_eps, name="q_norm")
    k_norm = RMSNorm((heads, head_dim), ("heads_norm", "kv"), cfg.norm_eps, name="k_norm")
    q = apply_rope_to_heads(q_norm(q), inputs.cos, inputs.sin, rotated_heads)
    k = apply_rope_to_heads(k_norm(k), inputs.cos, inputs.sin, rotated_heads)

    keys, values = [k], [v]
    masks = [jnp.ones((batch, frames), bool)]
    if "latent_k" in context:
      latent_k = k_norm(context["latent_k"].astype(cfg.compute_dtype))
      keys.append(apply_rope_to_heads(latent_k, inputs.latent_cos, inputs.latent_sin, rotated_heads))
      values.append(context["latent_v"].astype(cfg.compute_dtype))
      masks.append(inputs.latent_mask)
    keys.append(k_norm(context["text_k"].astype(cfg.compute_dtype)))
    values.append(context["text_v"].astype(cfg.compute_dtype))
    masks.append(inputs.text_mask)
    # "Force speaker": the sampler may scale the speaker K/V of some layers (1.0 = unchanged, as in training).
    scale = speaker_kv_scale.astype(cfg.compute_dtype)
    keys.append(k_norm(context["speaker_k"].astype(cfg.compute_dtype)) * scale)
    values.append(context["speaker_v"].astype(cfg.compute_dtype) * scale)
    masks.append(inputs.speaker_mask)

    mask = jnp.concatenate(masks, axis=1)[:, None, :]  # [B, 1, T + P + L + S]
    out = attention(q, jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1), mask)
    out = out.reshape(batch, frames, cfg.dim)
    out = out * jax.nn.sigmoid(dense(cfg.dim, ("embed", "heads"), name="gate", dtype=cfg.compute_dtype)(h))
    return dense(cfg.dim, ("heads", "embed"), name="wo", dtype=cfg.compute_dtype)(out)


class DecoderBlock(nn.Module):
  """x += g·JointAttention(AdaLN(x)); x += g·SwiGLU(AdaLN(x)), with low-rank AdaLN from the timestep condition."""

  cfg: EchoConfig

  @nn.compact
  def __call__(self, x: jax.Array, context: dict[str, jax.Array], speaker_kv_scale: jax.Array,
               inputs: DecoderInputs) -> tuple[jax.Array, None]:
    cfg = self.cfg
    h, gate = LowRankAdaLN(cfg.dim, cfg.adaln_rank, cfg.norm_eps, cfg.compute_dtype, name="attention_adaln")(
        x, inputs.cond)
    x = x + gate * JointAttention(cfg, name="attention")(h, context, speaker_kv_scale, inputs)
    h, gate = LowRankAdaLN(cfg.dim, cfg.adaln_rank, cfg.norm_eps, cfg.compute_dtype, name="mlp_adaln")(
        x, inputs.cond)
    x = x + gate * SwiGLU(cfg.dim, cfg.mlp_dim, cfg.compute_dtype, name="mlp")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), None


@flax.struct.dataclass
class Context:
  """The conditioning of one generation: per-layer K/V [N, B, ·, H, hd] and the key masks."""

  kv: dict[str, jax.Array]
  text_mask: jax.Array  # [B, L]
  speaker_mask: jax.Array  # [B, S]
  latent_mask: jax.Array | None = None  # [B, P] prefix patches (before the start_pos cut)


class Echo(nn.Module):
  """The Echo DiT. `__call__` = `decode(x_t, t, encode_context(...))`."""

  cfg: EchoConfig

  def setup(self):
    cfg = self.cfg
    self.text_encoder = TextEncoder(cfg)
    self.text_norm = RMSNorm((cfg.text_dim,), ("norm",), cfg.norm_eps)
    self.speaker_encoder = PatchedEncoder(cfg)
    self.speaker_norm = RMSNorm((cfg.speaker_dim,), ("norm",), cfg.norm_eps)
    if cfg.blockwise:
      self.latent_encoder = PatchedEncoder(cfg)
      self.latent_norm = RMSNorm((cfg.speaker_dim,), ("norm",), cfg.norm_eps)
    self.context_kv = scan_layers(ContextKV, cfg, cfg.layers, (nn.broadcast,) * 3, "context_kv")
    self.cond_module = TimestepCondition(cfg)
    self.in_proj = dense(cfg.dim, ("latent", "embed"), name="in_proj", dtype=cfg.compute_dtype, use_bias=True)
    self.blocks = scan_layers(DecoderBlock, cfg, cfg.layers, (0, 0, nn.broadcast), "blocks")
    self.out_norm = RMSNorm((cfg.dim,), ("norm",), cfg.norm_eps)
    self.out_proj = dense(cfg.latent_dim, ("embed", "latent"), name="out_proj", dtype=cfg.compute_dtype,
                          use_bias=True, zero_init=True)

  def encode_context(self, text: jax.Array, text_mask: jax.Array, speaker: jax.Array, speaker_mask: jax.Array,
                     prefix: jax.Array | None = None) -> Context:
    """Runs the encoders and every layer's context K/V projections.

    text [B, L] int32, text_mask [B, L] bool, speaker [B, Ts, D] (zeros when absent), speaker_mask [B, Ts] bool,
    prefix [B, Tp, D] already generated latents (blockwise configs only).
    """
    cfg = self.cfg
    text_state = self.text_norm(self.text_encoder(text, text_mask))  # [B, L, text_dim]
    speaker_state = self.speaker_norm(self.speaker_encoder(speaker))  # [B, S, speaker_dim]
    prefix_state, latent_mask = None, None
    if prefix is not None:
      if not cfg.blockwise:
        raise ValueError("a latent prefix needs a blockwise config (config.model.blockwise=True)")
      prefix_state = self.latent_norm(self.latent_encoder(prefix))
      latent_mask = jnp.ones(prefix_state.shape[:2], bool)
    _, kv = self.context_kv(None, text_state, speaker_state, prefix_state)
    speaker_mask = speaker_mask[:, ::cfg.speaker_patch]  # one flag per patch
    return Context(kv=kv, text_mask=text_mask, speaker_mask=speaker_mask, latent_mask=latent_mask)

  def decode(self, x_t: jax.Array, t: jax.Array, context: Context, start_pos: jax.Array | int = 0,
             speaker_kv_scale: jax.Array | None = None) -> jax.Array:
    """Velocity v [B, T, D] for noisy latents x_t [B, T, D] at times t [B].

    start_pos: frame index of x_t's first frame (blockwise continuation; 0 otherwise). speaker_kv_scale [N]:
    per-layer factor on the speaker K/V ("force speaker"); ones by default.
    """
    cfg = self.cfg
    batch, frames, _ = x_t.shape
    head_dim = cfg.dim // cfg.heads
    cos, sin = rope_angles(start_pos + jnp.arange(frames)[None], head_dim, cfg.rope_theta)
    inputs = DecoderInputs(cond=self.cond_module(t), cos=cos, sin=sin, text_mask=context.text_mask,
                           speaker_mask=context.speaker_mask)
    if context.latent_mask is not None:
      patch_frames = cfg.speaker_patch * jnp.arange(context.latent_mask.shape[1])
      latent_cos, latent_sin = rope_angles(patch_frames[None], head_dim, cfg.rope_theta)
      visible = context.latent_mask & (patch_frames[None] < start_pos)  # only patches before the block start
      inputs = inputs.replace(latent_mask=visible, latent_cos=latent_cos, latent_sin=latent_sin)
    if speaker_kv_scale is None:
      speaker_kv_scale = jnp.ones((cfg.layers,), jnp.float32)

    x = self.in_proj(x_t.astype(cfg.compute_dtype))  # [B, T, dim]
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    x, _ = self.blocks(x, context.kv, speaker_kv_scale, inputs)
    v = self.out_proj(self.out_norm(x))  # [B, T, D]
    return v.astype(jnp.float32)

  def __call__(self, x_t: jax.Array, t: jax.Array, text: jax.Array, text_mask: jax.Array, speaker: jax.Array,
               speaker_mask: jax.Array, prefix: jax.Array | None = None, start_pos: jax.Array | int = 0) -> jax.Array:
    return self.decode(x_t, t, self.encode_context(text, text_mask, speaker, speaker_mask, prefix), start_pos)

  # One thread at a time runs the model (`_TRACING`): `init` and `apply` are the ways in that echo-jax uses.
  @nn.nowrap
  def init(self, *args: Any, **kwargs: Any) -> Any:
    with _TRACING:
      return super().init(*args, **kwargs)

  @nn.nowrap
  def apply(self, *args: Any, **kwargs: Any) -> Any:
    with _TRACING:
      return super().apply(*args, **kwargs)

