"""The Echo sampler (DESIGN §8): Euler integration of the flow from noise (t=1) to latents (t=0) with CFG.

    encode_context once ──► context K/V (conditional) ──► unconditional contexts by zeroing masks
    noise × truncation ──► fori_loop over steps: ONE batched decode of [cond | uncond…] ─► guidance
                                                 ─► temporal score rescaling ─► Euler update

The whole loop is one compiled program. Modes (v_c conditional, v_¬text text dropped, v_¬spk speaker dropped,
v_u both dropped; CFG only while cfg_min_t ≤ t ≤ cfg_max_t, otherwise v = v_c from a single pass):
  independent  3 passes  v = v_c + s_text·(v_c − v_¬text) + s_speaker·(v_c − v_¬spk)
  joint        2 passes  v = v_c + s·(v_c − v_u)
  alternating  2 passes  even steps v = v_c + s_text·(v_c − v_¬text), odd steps v = v_c + s_speaker·(v_c − v_¬spk)

"Dropped" is what training's CFG dropout does (text mask zeroed; speaker latent and mask zeroed). The decoder's
attention replaces masked logits by the float32 minimum, so masked keys get exactly zero weight: the K/V behind a
zeroed mask never matter, and the dropped contexts reuse the conditional K/V with their masks zeroed instead of
running the encoders again (the tests compare against contexts encoded from truly dropped inputs).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from echo_jax.model import Context, Echo, EchoConfig

CFG_MODES = ("independent", "joint", "alternating")
# The schedule is scaled below 1 so that temporal score rescaling, which divides by (1 − t), applies from the first
# step (as upstream Echo does).
INIT_SCALE = 0.999
# Keys of upstream Echo's `sampler_presets.json` and the SamplerConfig fields they mean.
UPSTREAM_KEYS = {
    "num_steps": "steps",
    "cfg_scale_text": "cfg_text",
    "cfg_scale_speaker": "cfg_speaker",
    "truncation_factor": "truncation",
}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How to sample. Hashable: it is a static argument of the compiled sampler (one compilation per setting).

  speaker_kv_scale: "force speaker" factor on the speaker K/V of the first `speaker_kv_max_layers` decoder layers
  (all when None) for the steps with t ≥ speaker_kv_min_t; None disables it. rescale_k / rescale_sigma: temporal
  score rescaling (arXiv 2510.01184), off unless both are set.
  """

  steps: int = 32
  cfg_mode: str = "independent"
  cfg_text: float = 3.0
  cfg_speaker: float = 8.0
  cfg_scale: float = 3.0  # joint mode only
  cfg_min_t: float = 0.5
  cfg_max_t: float = 1.0
  truncation: float = 1.0
  rescale_k: float | None = None
  rescale_sigma: float | None = None
  speaker_kv_scale: float | None = None
  speaker_kv_max_layers: int | None = None
  speaker_kv_min_t: float = 0.9

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison below
        raise ValueError(f"{field.name} must be a finite number, got {value}")
    if self.steps < 1:
      raise ValueError(f"steps must be at least 1, got {self.steps}")
    if self.cfg_mode not in CFG_MODES:
      raise ValueError(f"cfg_mode={self.cfg_mode!r} is not one of {CFG_MODES}")
    if self.truncation <= 0:
      raise ValueError(f"truncation must be positive, got {self.truncation}")
    if (self.rescale_k is None) != (self.rescale_sigma is None):
      raise ValueError("temporal score rescaling needs both rescale_k and rescale_sigma (or neither)")
    if self.rescale_k is not None and self.rescale_k <= 0:
      raise ValueError(f"rescale_k must be positive, got {self.rescale_k}")
    if self.speaker_kv_max_layers is not None and self.speaker_kv_max_layers < 0:
      raise ValueError(f"speaker_kv_max_layers must be non-negative, got {self.speaker_kv_max_layers}")
    if self.cfg_min_t > self.cfg_max_t:
      raise ValueError(f"cfg_min_t={self.cfg_min_t} is above cfg_max_t={self.cfg_max_t}: guidance would never apply")

  @property
  def passes(self) -> int:
    """Decoder passes per guided step (the batch of one decode is passes × B)."""
    return 3 if self.cfg_mode == "independent" else 2

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> SamplerConfig:
    """A config from a preset entry; upstream Echo key names and string-valued numbers are accepted."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
      name = UPSTREAM_KEYS.get(key, key)
      if name not in fields:
        raise ValueError(f"unknown sampler setting {key!r}; known: {sorted(fields)}")
      if isinstance(value, str) and name != "cfg_mode":
        value = float(value)
      if name in ("steps", "speaker_kv_max_layers") and value is not None:
        value = int(value)
      kwargs[name] = value
    return cls(**kwargs)


def load_presets(path: str) -> dict[str, SamplerConfig]:
  """Every preset of a `sampler_presets.json` file (name -> settings)."""
  with open(path, encoding="utf-8") as f:
    entries = json.load(f)
  return {name: SamplerConfig.from_dict(values) for name, values in entries.items()}


def time_schedule(steps: int) -> np.ndarray:
  """t_0 … t_N: linspace(1, 0, N + 1) · 0.999, float32 [N + 1]."""
  return np.linspace(1.0, 0.0, steps + 1, dtype=np.float32) * np.float32(INIT_SCALE)


def guided_steps(sampler: SamplerConfig) -> np.ndarray:
  """bool [N]: the steps whose t lies in the CFG window [cfg_min_t, cfg_max_t]."""
  t = time_schedule(sampler.steps)[:-1]
  return (t >= sampler.cfg_min_t) & (t <= sampler.cfg_max_t)


def speaker_kv_scales(sampler: SamplerConfig, layers: int) -> np.ndarray:
  """float32 [N steps, layers]: the per-layer speaker K/V factor of each step (ones where forcing is off)."""
  scales = np.ones((sampler.steps, layers), np.float32)
  if sampler.speaker_kv_scale is not None:
    forced_layers = layers if sampler.speaker_kv_max_layers is None else min(sampler.speaker_kv_max_layers, layers)
    active = time_schedule(sampler.steps)[:-1] >= sampler.speaker_kv_min_t
    scales[np.ix_(active, np.arange(forced_layers))] = sampler.speaker_kv_scale
  return scales


def temporal_score_rescale(v: jax.Array, x_t: jax.Array, t: jax.Array, k: float, sigma: float) -> jax.Array:
  """Temporal score rescaling (arXiv 2510.01184) of a velocity, as upstream Echo applies it (for t < 1).

  With the clean-sample estimate x̂0 = x_t − t·v: v' = ((ratio·((1 − t)·v + x_t)) − x_t) / (1 − t), where
  snr = (1 − t)² / t² and ratio = (snr·σ² + 1) / (snr·σ²/k + 1).
  """
  snr = jnp.square(1.0 - t) / jnp.square(t)
  ratio = (snr * sigma**2 + 1.0) / (snr * sigma**2 / k + 1.0)
  return (ratio * ((1.0 - t) * v + x_t) - x_t) / (1.0 - t)


def combine_guidance(sampler: SamplerConfig, velocities: jax.Array, step: jax.Array) -> jax.Array:
  """The guided velocity from the stacked passes [passes, B, T, D] of one step (order as `guidance_masks`)."""
  v_cond = velocities[0]
  if sampler.cfg_mode == "independent":
    return (v_cond + sampler.cfg_text * (v_cond - velocities[1])
            + sampler.cfg_speaker * (v_cond - velocities[2]))
  if sampler.cfg_mode == "joint":
    return v_cond + sampler.cfg_scale * (v_cond - velocities[1])
  scale = jnp.where(step % 2 == 0, sampler.cfg_text, sampler.cfg_speaker)
  return v_cond + scale * (v_cond - velocities[1])


def guidance_masks(sampler: SamplerConfig, text_mask: jax.Array, speaker_mask: jax.Array,
                   step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(text mask, speaker mask) [passes·B, ·] of one guided step: the conditional pass first, then the dropped ones.

  independent: [cond, text dropped, speaker dropped]; joint: [cond, both dropped]; alternating: [cond, text dropped]
  on even steps and [cond, speaker dropped] on odd steps.
  """
  no_text, no_speaker = jnp.zeros_like(text_mask), jnp.zeros_like(speaker_mask)
  if sampler.cfg_mode == "independent":
    texts, speakers = (text_mask, no_text, text_mask), (speaker_mask, speaker_mask, no_speaker)
  elif sampler.cfg_mode == "joint":
    texts, speakers = (text_mask, no_text), (speaker_mask, no_speaker)
  else:
    even = step % 2 == 0
    texts = (text_mask, jnp.where(even, no_text, text_mask))
    speakers = (speaker_mask, jnp.where(even, speaker_mask, no_speaker))
  return jnp.concatenate(texts, axis=0), jnp.concatenate(speakers, axis=0)


def _repeat_batch(tree: Any, times: int, axis: int) -> Any:
  return jax.tree.map(lambda a: jnp.concatenate([a] * times, axis=axis), tree)


@functools.partial(jax.jit, static_argnames=("cfg", "sampler", "frames", "on_step"))
def _sample(params: Any, key: jax.Array, text: jax.Array, text_mask: jax.Array, speaker: jax.Array,
            speaker_mask: jax.Array, prefix: jax.Array | None, start_pos: jax.Array, *, cfg: EchoConfig,
            sampler: SamplerConfig, frames: int, on_step: Callable[[Any], None] | None) -> jax.Array:
  model = Echo(cfg)
  variables = {"params": params}
  batch = text.shape[0]
  context = model.apply(variables, text, text_mask, speaker, speaker_mask, prefix, method=Echo.encode_context)
  passes = sampler.passes
  # Context K/V are [N layers, B, ·, H, hd]: batch is axis 1. Every pass of a guided step shares one decode.
  guided_kv = _repeat_batch(context.kv, passes, axis=1)
  guided_latent_mask = None if context.latent_mask is None else _repeat_batch(context.latent_mask, passes, axis=0)

  schedule = jnp.asarray(time_schedule(sampler.steps))
  kv_scales = jnp.asarray(speaker_kv_scales(sampler, cfg.layers))
  guided = guided_steps(sampler)

  def decode(x_t, t, ctx, kv_scale):
    t_batch = jnp.full((x_t.shape[0],), t, jnp.float32)
    return model.apply(variables, x_t, t_batch, ctx, start_pos, kv_scale, method=Echo.decode)

  def plain_velocity(x_t, t, step):
    return decode(x_t, t, context, kv_scales[step])

  def guided_velocity(x_t, t, step):
    text_masks, speaker_masks = guidance_masks(sampler, context.text_mask, context.speaker_mask, step)
    ctx = Context(kv=guided_kv, text_mask=text_masks, speaker_mask=speaker_masks, latent_mask=guided_latent_mask)
    v = decode(_repeat_batch(x_t, passes, axis=0), t, ctx, kv_scales[step])
    return combine_guidance(sampler, v.reshape(passes, batch, *v.shape[1:]), step)

  def body(step, x_t):
    t, t_next = schedule[step], schedule[step + 1]
    if guided.all():
      v = guided_velocity(x_t, t, step)
    elif not guided.any():
      v = plain_velocity(x_t, t, step)
    else:
      v = jax.lax.cond(jnp.asarray(guided)[step], guided_velocity, plain_velocity, x_t, t, step)
    if sampler.rescale_k is not None:
      v = temporal_score_rescale(v, x_t, t, sampler.rescale_k, sampler.rescale_sigma)
    if on_step is not None:
      jax.debug.callback(on_step, step)
    return x_t + v * (t_next - t)

  noise = jax.random.normal(key, (batch, frames, cfg.latent_dim), jnp.float32) * sampler.truncation
  return jax.lax.fori_loop(0, sampler.steps, body, noise)


def _check_inputs(cfg: EchoConfig, text: jax.Array, text_mask: jax.Array, speaker: jax.Array,
                  speaker_mask: jax.Array) -> None:
  batch = text.shape[0]
  if text.ndim != 2 or text_mask.shape != text.shape:
    raise ValueError(f"text {text.shape} and text_mask {text_mask.shape} must both be [B, L]")
  if speaker.ndim != 3 or speaker.shape[0] != batch or speaker.shape[2] != cfg.latent_dim:
    raise ValueError(f"speaker must be [B={batch}, Ts, D={cfg.latent_dim}], got {speaker.shape}")
  if speaker_mask.shape != speaker.shape[:2]:
    raise ValueError(f"speaker_mask {speaker_mask.shape} must be [B, Ts] = {speaker.shape[:2]}")
  if speaker.shape[1] % cfg.speaker_patch or speaker.shape[1] == 0:
    raise ValueError(f"speaker reference of {speaker.shape[1]} frames must be a positive multiple of the patch "
                     f"size {cfg.speaker_patch}")


def sample(params: Any, cfg: EchoConfig, sampler: SamplerConfig, key: jax.Array, text: jax.Array,
           text_mask: jax.Array, speaker: jax.Array, speaker_mask: jax.Array, frames: int, *,
           prefix: jax.Array | None = None, start_pos: int = 0,
           on_step: Callable[[Any], None] | None = None) -> jax.Array:
  """Latents [B, frames, D] for a batch of texts [B, L] with speaker references [B, Ts, D] (zeros and a zero mask
  when there is none).

  prefix [B, Tp, D] (blockwise configs): already generated latents; the new frames start at frame `start_pos` and
  see the prefix patches before it. on_step(step) is called on the host after each step (progress bars); pass the
  same callable every time, since it is part of what the compiled program is cached under.
  """
  _check_inputs(cfg, text, text_mask, speaker, speaker_mask)
  if frames < 1:
    raise ValueError(f"frames must be at least 1, got {frames}")
  if prefix is not None:
    if not cfg.blockwise:
      raise ValueError("a latent prefix needs a blockwise config (model.blockwise=True)")
    if prefix.shape[0] != text.shape[0] or prefix.shape[2] != cfg.latent_dim or prefix.shape[1] % cfg.speaker_patch:
      raise ValueError(f"prefix must be [B, Tp, {cfg.latent_dim}] with Tp a multiple of {cfg.speaker_patch}, "
                       f"got {prefix.shape}")
  return _sample(params, key, jnp.asarray(text, jnp.int32), jnp.asarray(text_mask, bool),
                 jnp.asarray(speaker, jnp.float32), jnp.asarray(speaker_mask, bool),
                 None if prefix is None else jnp.asarray(prefix, jnp.float32), jnp.asarray(start_pos, jnp.int32),
                 cfg=cfg, sampler=sampler, frames=frames, on_step=on_step)


def sample_blockwise(params: Any, cfg: EchoConfig, sampler: SamplerConfig, key: jax.Array, text: jax.Array,
                     text_mask: jax.Array, speaker: jax.Array, speaker_mask: jax.Array, block_sizes: Sequence[int],
                     continuation: jax.Array | None = None) -> jax.Array:
  """Generates `block_sizes` frames block after block, each block conditioned on everything before it (blockwise
  configs), optionally continuing the given latents `continuation` [B, Tc, D]. Returns [B, Tc + Σ blocks, D].

  As upstream Echo does, the prefix buffer holds the whole output (zeros where not yet generated); the latent
  encoder is causal and the decoder sees only the patches that begin before the block start (4p < start_pos, as
  upstream). So the zeros are not seen when every block starts on a patch boundary (a multiple of 4 frames); a start
  inside a patch shows the decoder that patch with its not yet generated frames as zeros, as upstream does too.
  Its text and speaker encoders run again for each block (with the block's prefix).
  """
  if not cfg.blockwise:
    raise ValueError("blockwise sampling needs a blockwise config (model.blockwise=True)")
  if not block_sizes or min(block_sizes) < 1:
    raise ValueError(f"block_sizes must be positive, got {list(block_sizes)}")
  batch = text.shape[0]
  start = 0 if continuation is None else continuation.shape[1]
  total = start + sum(block_sizes)
  padded = -(-total // cfg.speaker_patch) * cfg.speaker_patch  # the latent encoder patches 4 frames at a time
  buffer = jnp.zeros((batch, padded, cfg.latent_dim), jnp.float32)
  if continuation is not None:
    buffer = buffer.at[:, :start].set(jnp.asarray(continuation, jnp.float32))
  for index, block in enumerate(block_sizes):
    latents = sample(params, cfg, sampler, jax.random.fold_in(key, index), text, text_mask, speaker, speaker_mask,
                     block, prefix=buffer, start_pos=start)
    buffer = buffer.at[:, start:start + block].set(latents)
    start += block
  return buffer[:, :total]


def end_of_speech(latents: np.ndarray, pad_latent: np.ndarray, tolerance: float = 0.1) -> int:
  """The first frame after which `latents` [T, D] stays at `pad_latent` [D]: T when the last frame is not silence.

  A frame counts as silence when the RMS over dims of (frame − pad latent) is at most `tolerance`. Codec latents
  are normalised to roughly unit variance on speech (the mel codec by construction, DACVAE by its training), and
  a speech frame differs from the pad latent by order 1 per dim, so 0.1 accepts the small residual error of a
  trained model's silence while no speech frame passes. Only the tail counts: a pause inside the speech is kept.
  """
  latents = np.asarray(latents, np.float32)
  pad = np.asarray(pad_latent, np.float32).reshape(-1)
  if latents.ndim != 2 or latents.shape[1] != pad.size:
    raise ValueError(f"latents must be [T, {pad.size}] to compare with the pad latent, got {latents.shape}")
  distance = np.sqrt(np.mean(np.square(latents - pad), axis=1))  # [T]
  speech = np.flatnonzero(~(distance <= tolerance))  # NaN frames count as speech: never cropped away silently
  return 0 if speech.size == 0 else int(speech[-1]) + 1
