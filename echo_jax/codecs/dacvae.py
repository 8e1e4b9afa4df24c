"""DACVAE, the 48 kHz audio VAE of Echo, in JAX.

A port of facebookresearch/dacvae (itself built on descript-audio-codec): a strided Snake/conv encoder, a VAE
bottleneck (a 1x1 conv giving mean and log-scale; inference uses the mean) and a transposed-conv decoder whose
output passes through the watermarking branch of the published decoder.

Parameters are a flat dict keyed by the reference PyTorch state-dict names, with weight norm folded: every
`<conv>.weight_g` / `<conv>.weight_v` pair becomes one `<conv>.weight` (see `dacvae_convert`). Arrays keep the
PyTorch layouts (Conv1d [out, in, k], ConvTranspose1d [in, out, k], Snake alpha [1, C, 1], LSTM gates i, f, g, o),
so imported weights are used as stored and the convolutions name those layouts in their dimension numbers.
Activations inside are channels-last [B, L, C].
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Reduced-precision conv passes (TPU bf16, GPU TF32 defaults) would make codec output depend on the device;
# the codec sits in data preparation and inference, not the training hot loop, so it pays for full precision.
_PRECISION = lax.Precision.HIGHEST

# The reference decoder splits each block's watermark branch to a third of the block's channels.
_WM_CHANNEL_DIVISOR = 3

# Safetensors metadata key holding the config as JSON.
CONFIG_METADATA_KEY = "dacvae_config"


@dataclasses.dataclass(frozen=True)
class DacvaeConfig:
  """Architecture hyperparameters; the defaults are the published 48 kHz checkpoint."""

  sample_rate: int = 48000
  encoder_dim: int = 64
  encoder_rates: tuple[int, ...] = (2, 8, 10, 12)
  latent_dim: int = 1024  # encoder output width, fed to the VAE bottleneck
  codebook_dim: int = 128  # VAE latent width: what `encode` returns
  decoder_dim: int = 1536
  decoder_rates: tuple[int, ...] = (12, 10, 8, 2)
  wm_rates: tuple[int, ...] = (8, 5, 4, 2)
  wm_channels: int = 32
  wm_hidden: int = 512
  wm_latent_dim: int = 128
  nbits: int = 16
  lstm_layers: int = 2

  def __post_init__(self):
    object.__setattr__(self, "encoder_rates", tuple(int(r) for r in self.encoder_rates))
    object.__setattr__(self, "decoder_rates", tuple(int(r) for r in self.decoder_rates))
    object.__setattr__(self, "wm_rates", tuple(int(r) for r in self.wm_rates))
    n = len(self.decoder_rates)
    if len(self.wm_rates) != n:
      raise ValueError(f"wm_rates {self.wm_rates} must have one rate per decoder rate {self.decoder_rates}")
    if math.prod(self.decoder_rates) != self.hop_length:
      raise ValueError(f"decoder_rates {self.decoder_rates} must upsample by the hop {self.hop_length}")
    if self.hop_length % math.prod(self.wm_rates):
      raise ValueError(f"wm_rates {self.wm_rates} must divide the hop {self.hop_length}")
    for i in range(n + 1):
      if self.decoder_dim % (2**i * _WM_CHANNEL_DIVISOR):
        raise ValueError(f"decoder_dim {self.decoder_dim} / 2**{i} must be divisible by 3")
    if self.wm_channels != self.decoder_dim // 2**n // _WM_CHANNEL_DIVISOR:
      raise ValueError(f"wm_channels {self.wm_channels} must be decoder_dim / 2**{n} / 3")
    if self.wm_hidden != self.decoder_dim // _WM_CHANNEL_DIVISOR:
      raise ValueError(f"wm_hidden {self.wm_hidden} must be decoder_dim / 3")

  @property
  def hop_length(self) -> int:
    return math.prod(self.encoder_rates)

  @property
  def frame_rate(self) -> float:
    return self.sample_rate / self.hop_length

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> DacvaeConfig:
    return cls(**json.loads(text))

  @classmethod
  def from_reference_kwargs(cls, kwargs: Mapping[str, Any]) -> DacvaeConfig:
    """Builds a config from the reference `DACVAE(**kwargs)` arguments saved in a checkpoint's metadata."""
    ignored = {"n_codebooks", "codebook_size", "quantizer_dropout"}  # quantizer options unused by the VAE
    known = {"sample_rate", "encoder_dim", "encoder_rates", "latent_dim", "codebook_dim", "decoder_dim",
             "decoder_rates"}
    unknown = set(kwargs) - ignored - known
    if unknown:
      raise ValueError(f"unknown DACVAE checkpoint kwargs: {sorted(unknown)}")
    fields = {k: v for k, v in kwargs.items() if k in known and v is not None}
    if "latent_dim" not in fields:
      # The reference derives the encoder width when latent_dim is None.
      dim = fields.get("encoder_dim", cls.encoder_dim)
      fields["latent_dim"] = dim * 2 ** len(fields.get("encoder_rates", cls.encoder_rates))
    return cls(**fields)


# ---------------------------------------------------------------------------------------------------------------
# Parameter table


def _conv_shapes(name: str, out_ch: int, in_ch: int, kernel: int, weight_norm: bool) -> dict[str, tuple]:
  if weight_norm:
    return {f"{name}.weight_g": (out_ch, 1, 1), f"{name}.weight_v": (out_ch, in_ch, kernel),
            f"{name}.bias": (out_ch,)}
  return {f"{name}.weight": (out_ch, in_ch, kernel), f"{name}.bias": (out_ch,)}


def _conv_t_shapes(name: str, in_ch: int, out_ch: int, kernel: int, weight_norm: bool) -> dict[str, tuple]:
  # torch ConvTranspose1d stores [in, out, k] and weight_norm(dim=0) normalises per input channel.
  if weight_norm:
    return {f"{name}.weight_g": (in_ch, 1, 1), f"{name}.weight_v": (in_ch, out_ch, kernel),
            f"{name}.bias": (out_ch,)}
  return {f"{name}.weight": (in_ch, out_ch, kernel), f"{name}.bias": (out_ch,)}


def _snake_shapes(name: str, ch: int) -> dict[str, tuple]:
  return {f"{name}.alpha": (1, ch, 1)}


def _snake_unit_shapes(name: str, dim: int) -> dict[str, tuple]:
  return {**_snake_shapes(f"{name}.block.0", dim), **_conv_shapes(f"{name}.block.1", dim, dim, 7, True),
          **_snake_shapes(f"{name}.block.2", dim), **_conv_shapes(f"{name}.block.3", dim, dim, 1, True)}


def _elu_unit_shapes(name: str, dim: int) -> dict[str, tuple]:
  hidden = dim // 2
  return {**_conv_shapes(f"{name}.block.1", hidden, dim, 3, False),
          **_conv_shapes(f"{name}.block.3", dim, hidden, 1, False)}


def _lstm_shapes(name: str, size: int, layers: int) -> dict[str, tuple]:
  shapes = {}
  for i in range(layers):
    shapes |= {f"{name}.weight_ih_l{i}": (4 * size, size), f"{name}.weight_hh_l{i}": (4 * size, size),
               f"{name}.bias_ih_l{i}": (4 * size,), f"{name}.bias_hh_l{i}": (4 * size,)}
  return shapes


def state_dict_shapes(config: DacvaeConfig) -> dict[str, tuple[int, ...]]:
  """Key -> shape of the reference PyTorch state dict (weight-normalised convs as weight_g / weight_v)."""
  c = config
  shapes = _conv_shapes("encoder.block.0", c.encoder_dim, 1, 7, True)
  dim = c.encoder_dim
  for i, stride in enumerate(c.encoder_rates):
    block = f"encoder.block.{i + 1}.block"
    for j in range(3):
      shapes |= _snake_unit_shapes(f"{block}.{j}", dim)
    shapes |= _snake_shapes(f"{block}.3", dim) | _conv_shapes(f"{block}.4", 2 * dim, dim, 2 * stride, True)
    dim *= 2
  n = len(c.encoder_rates)
  shapes |= _snake_shapes(f"encoder.block.{n + 1}", dim)
  shapes |= _conv_shapes(f"encoder.block.{n + 2}", c.latent_dim, dim, 3, True)
  shapes |= _conv_shapes("quantizer.in_proj", 2 * c.codebook_dim, c.latent_dim, 1, True)
  shapes |= _conv_shapes("quantizer.out_proj", c.latent_dim, c.codebook_dim, 1, True)
  shapes |= _conv_shapes("decoder.model.0", c.decoder_dim, c.latent_dim, 7, True)
  for i, (stride, wm_stride) in enumerate(zip(c.decoder_rates, c.wm_rates, strict=True)):
    d_in, d_out = c.decoder_dim // 2**i, c.decoder_dim // 2 ** (i + 1)
    wm_in, wm_out = d_in // _WM_CHANNEL_DIVISOR, d_out // _WM_CHANNEL_DIVISOR
    block = f"decoder.model.{i + 1}.block"
    shapes |= _snake_shapes(f"{block}.0", d_in) | _conv_t_shapes(f"{block}.1", d_in, d_out, 2 * stride, True)
    shapes |= _conv_t_shapes(f"{block}.3", wm_in, wm_out, 2 * wm_stride, False)
    shapes |= _snake_unit_shapes(f"{block}.4", d_out) | _snake_unit_shapes(f"{block}.5", d_out)
    shapes |= _elu_unit_shapes(f"{block}.6", wm_out) | _elu_unit_shapes(f"{block}.7", wm_out)
    shapes |= _snake_unit_shapes(f"{block}.8", d_out)
    shapes |= _conv_shapes(f"{block}.11", wm_in, wm_out, 2 * wm_stride, False)
  d_last = c.decoder_dim // 2 ** len(c.decoder_rates)
  wm = "decoder.wm_model"
  shapes |= _snake_shapes(f"{wm}.encoder_block.pre.0", d_last)
  shapes |= _conv_shapes(f"{wm}.encoder_block.pre.1", 1, d_last, 7, True)
  shapes |= _conv_shapes(f"{wm}.encoder_block.pre.3", c.wm_channels, 1, 7, False)
  shapes |= _lstm_shapes(f"{wm}.encoder_block.post.0.lstm", c.wm_hidden, c.lstm_layers)
  shapes |= _conv_shapes(f"{wm}.encoder_block.post.2", c.wm_latent_dim, c.wm_hidden, 7, False)
  shapes |= {f"{wm}.msg_processor.msg_processor.weight": (2 * c.nbits, c.wm_latent_dim)}
  shapes |= _conv_shapes(f"{wm}.decoder_block.pre.0", c.wm_hidden, c.wm_latent_dim, 7, False)
  shapes |= _lstm_shapes(f"{wm}.decoder_block.pre.1.lstm", c.wm_hidden, c.lstm_layers)
  shapes |= _conv_shapes(f"{wm}.decoder_block.post.1", 1, c.wm_channels, 7, False)
  return shapes


def param_shapes(config: DacvaeConfig) -> dict[str, tuple[int, ...]]:
  """Key -> shape of the folded parameters the forward pass reads (weight_g/weight_v -> weight)."""
  shapes = {}
  for key, shape in state_dict_shapes(config).items():
    if key.endswith(".weight_g"):
      continue
    if key.endswith(".weight_v"):
      key = key[: -len("_v")]
    shapes[key] = shape
  return shapes


def check_shapes(arrays: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
  """Raises ValueError naming the first missing, unexpected or wrongly-shaped key."""
  missing = sorted(set(expected) - set(arrays))
  if missing:
    raise ValueError(f"{what}: missing key {missing[0]!r} ({len(missing)} missing)")
  extra = sorted(set(arrays) - set(expected))
  if extra:
    raise ValueError(f"{what}: unexpected key {extra[0]!r} ({len(extra)} unexpected)")
  for key, shape in expected.items():
    if tuple(arrays[key].shape) != tuple(shape):
      raise ValueError(f"{what}: key {key!r} has shape {tuple(arrays[key].shape)}, expected {tuple(shape)}")


def load_dacvae(path: str | os.PathLike) -> tuple[DacvaeConfig, dict[str, np.ndarray]]:
  """Loads a safetensors file written by `dacvae_convert`: (config, folded float32 params)."""
  from safetensors import SafetensorError, safe_open
  from safetensors.numpy import load_file

  try:
    with safe_open(os.fspath(path), framework="numpy") as f:
      metadata = f.metadata() or {}
    if CONFIG_METADATA_KEY not in metadata:
      raise ValueError(f"{path}: no {CONFIG_METADATA_KEY!r} metadata; write it with echo_jax.codecs.dacvae_convert")
    config = DacvaeConfig.from_json(metadata[CONFIG_METADATA_KEY])
    params = load_file(os.fspath(path))
  except SafetensorError as error:  # not an OSError nor a ValueError: a traceback, not the CLI's error line
    raise ValueError(f"{path} is not a readable safetensors file ({error}): the file is damaged or cut short; "
                     "convert the weights again with echo_jax.codecs.dacvae_convert") from error
  check_shapes(params, param_shapes(config), str(path))
  return config, params


# ---------------------------------------------------------------------------------------------------------------
# Layers (channels-last activations, PyTorch-layout weights)


def conv1d(x: jax.Array, weight: jax.Array, bias: jax.Array, *, stride: int = 1, dilation: int = 1,
           padding: tuple[int, int] = (0, 0)) -> jax.Array:
  """torch Conv1d on [B, L, C_in] with weight [C_out, C_in, k] and explicit (left, right) zero padding."""
  y = lax.conv_general_dilated(x, weight, window_strides=(stride,), padding=[padding], rhs_dilation=(dilation,),
                               dimension_numbers=("NWC", "OIW", "NWC"), precision=_PRECISION)
  return y + bias


def conv_transpose1d(x: jax.Array, weight: jax.Array, bias: jax.Array, *, stride: int, padding: int = 0,
                     output_padding: int = 0) -> jax.Array:
  """torch ConvTranspose1d on [B, L, C_in] with weight [C_in, C_out, k].

  Written as the equivalent forward conv (input dilated by the stride, kernel flipped) because
  `lax.conv_transpose` pads differently from torch and would need the same arithmetic to match.
  """
  k = weight.shape[-1]
  y = lax.conv_general_dilated(x, jnp.flip(weight, axis=-1), window_strides=(1,),
                               padding=[(k - 1 - padding, k - 1 - padding + output_padding)],
                               lhs_dilation=(stride,), dimension_numbers=("NWC", "IOW", "NWC"),
                               precision=_PRECISION)
  return y + bias


def causal_padding(length: int, kernel: int, stride: int) -> tuple[int, int]:
  """The reference NormConv1d 'auto' causal padding: all of k - s on the left, plus enough on the right for
  a whole number of output frames."""
  total = kernel - stride
  n_frames = math.ceil((length - kernel + total) / stride + 1)
  extra = (n_frames - 1) * stride + (kernel - total) - length
  return total, extra


def snake(x: jax.Array, alpha: jax.Array) -> jax.Array:
  """x + sin(alpha x)^2 / (alpha + 1e-9), per channel; alpha is stored [1, C, 1]."""
  alpha = alpha.reshape(-1)
  return x + jnp.reciprocal(alpha + 1e-9) * jnp.sin(alpha * x) ** 2


def lstm(x: jax.Array, params: Mapping[str, jax.Array], name: str, layers: int) -> jax.Array:
  """Stacked torch nn.LSTM over [B, T, C] from zero state.

  A plain scan rather than a flax cell, to read torch's fused [4H, C] gate matrices (order i, f, g, o) and its
  two bias vectors as stored.
  """
  y = x
  for i in range(layers):
    w_ih, w_hh = params[f"{name}.weight_ih_l{i}"], params[f"{name}.weight_hh_l{i}"]
    gates_x = jnp.einsum("btc,gc->btg", y, w_ih, precision=_PRECISION)
    gates_x = gates_x + params[f"{name}.bias_ih_l{i}"] + params[f"{name}.bias_hh_l{i}"]
    hidden = w_hh.shape[1]

    def step(carry, g_x, w_hh=w_hh):
      h, c = carry
      g = g_x + jnp.einsum("bh,gh->bg", h, w_hh, precision=_PRECISION)
      gi, gf, gg, go = jnp.split(g, 4, axis=-1)
      c = jax.nn.sigmoid(gf) * c + jax.nn.sigmoid(gi) * jnp.tanh(gg)
      h = jax.nn.sigmoid(go) * jnp.tanh(c)
      return (h, c), h

    zeros = jnp.zeros((y.shape[0], hidden), y.dtype)
    _, hs = lax.scan(step, (zeros, zeros), jnp.swapaxes(gates_x, 0, 1))
    y = jnp.swapaxes(hs, 0, 1)
  return y


def _wn_conv(p, name, x, *, stride=1, dilation=1):
  """A weight-normalised NormConv1d: symmetric padding (k - s) * d // 2."""
  w = p[f"{name}.weight"]
  pad = (w.shape[-1] - stride) * dilation // 2
  return conv1d(x, w, p[f"{name}.bias"], stride=stride, dilation=dilation, padding=(pad, pad))


def _causal_conv(p, name, x, *, stride=1):
  w = p[f"{name}.weight"]
  pad = causal_padding(x.shape[1], w.shape[-1], stride)
  return conv1d(x, w, p[f"{name}.bias"], stride=stride, padding=pad)


def _causal_conv_t(p, name, x, *, stride):
  """ConvTranspose1d without padding, then the causal 'auto' unpad: drop k - s samples on the right."""
  w = p[f"{name}.weight"]
  y = conv_transpose1d(x, w, p[f"{name}.bias"], stride=stride)
  return y[:, : y.shape[1] - (w.shape[-1] - stride)]


def _snake_unit(p, name, x, dilation):
  y = _wn_conv(p, f"{name}.block.1", snake(x, p[f"{name}.block.0.alpha"]), dilation=dilation)
  y = _wn_conv(p, f"{name}.block.3", snake(y, p[f"{name}.block.2.alpha"]))
  return x + y


def _elu_unit(p, name, x):
  y = _causal_conv(p, f"{name}.block.1", jax.nn.elu(x))
  y = _causal_conv(p, f"{name}.block.3", jax.nn.elu(y))
  return x + y


# ---------------------------------------------------------------------------------------------------------------
# Model


def encode(params: Mapping[str, jax.Array], audio: jax.Array, config: DacvaeConfig) -> jax.Array:
  """Audio [B, N] (N a multiple of the hop) -> VAE means [B, N / hop, codebook_dim]."""
  if audio.shape[-1] % config.hop_length:
    raise ValueError(f"audio length {audio.shape[-1]} is not a multiple of the hop {config.hop_length}")
  p = params
  x = _wn_conv(p, "encoder.block.0", audio[..., None])
  for i, stride in enumerate(config.encoder_rates):
    block = f"encoder.block.{i + 1}.block"
    for j, dilation in enumerate((1, 3, 9)):
      x = _snake_unit(p, f"{block}.{j}", x, dilation)
    x = _wn_conv(p, f"{block}.4", snake(x, p[f"{block}.3.alpha"]), stride=stride)
  n = len(config.encoder_rates)
  x = _wn_conv(p, f"encoder.block.{n + 2}", snake(x, p[f"encoder.block.{n + 1}.alpha"]))
  stats = _wn_conv(p, "quantizer.in_proj", x)
  return stats[..., : config.codebook_dim]  # [mean, log-scale] halves; inference keeps the mean


def decode(params: Mapping[str, jax.Array], latents: jax.Array, config: DacvaeConfig,
           message: jax.Array | None = None) -> jax.Array:
  """Latents [B, T, codebook_dim] -> audio [B, T * hop], through the watermarking branch.

  `message` is the watermark's nbits bits ([nbits] or [B, nbits], 0/1); the reference draws random bits per
  call, here it defaults to all zeros so decoding is deterministic.
  """
  p = params
  batch = latents.shape[0]
  if message is None:
    message = jnp.zeros((config.nbits,), jnp.int32)
  message = jnp.broadcast_to(jnp.asarray(message, jnp.int32), (batch, config.nbits))

  x = _wn_conv(p, "quantizer.out_proj", latents)
  x = _wn_conv(p, "decoder.model.0", x)
  for i, stride in enumerate(config.decoder_rates):
    block = f"decoder.model.{i + 1}.block"
    x = snake(x, p[f"{block}.0.alpha"])
    # Main upsampler: weight-normalised ConvTranspose1d with padding ceil(s / 2), output_padding s % 2.
    x = conv_transpose1d(x, p[f"{block}.1.weight"], p[f"{block}.1.bias"], stride=stride,
                         padding=(stride + 1) // 2, output_padding=stride % 2)
    for j, dilation in ((4, 1), (5, 3), (8, 9)):
      x = _snake_unit(p, f"{block}.{j}", x, dilation)

  wm = "decoder.wm_model"
  # The published decoder has no separate output head: the watermark encoder's Snake -> conv -> tanh is it.
  audio = jnp.tanh(_wn_conv(p, f"{wm}.encoder_block.pre.1", snake(x, p[f"{wm}.encoder_block.pre.0.alpha"])))
  h = _causal_conv(p, f"{wm}.encoder_block.pre.3", audio)
  # Down the decoder blocks in reverse through their watermark 'upsample groups' (strided causal convs).
  for i in reversed(range(len(config.decoder_rates))):
    block = f"decoder.model.{i + 1}.block"
    h = _elu_unit(p, f"{block}.7", h)
    h = _causal_conv(p, f"{block}.11", jax.nn.elu(h), stride=config.wm_rates[i])
  h = h + lstm(h, p, f"{wm}.encoder_block.post.0.lstm", config.lstm_layers)
  h = _causal_conv(p, f"{wm}.encoder_block.post.2", jax.nn.elu(h))
  # MsgProcessor: embedding rows 2 * bit_index + bit, summed over bits, added at every step.
  table = p[f"{wm}.msg_processor.msg_processor.weight"]
  h = h + table[2 * jnp.arange(config.nbits) + message].sum(axis=1)[:, None, :]
  h = _causal_conv(p, f"{wm}.decoder_block.pre.0", h)
  h = h + lstm(h, p, f"{wm}.decoder_block.pre.1.lstm", config.lstm_layers)
  # Back up through the blocks' watermark 'downsample groups' (causal transposed convs).
  for i, wm_stride in enumerate(config.wm_rates):
    block = f"decoder.model.{i + 1}.block"
    h = _causal_conv_t(p, f"{block}.3", jax.nn.elu(h), stride=wm_stride)
    h = _elu_unit(p, f"{block}.6", h)
  h = _causal_conv(p, f"{wm}.decoder_block.post.1", jax.nn.elu(h))
  # Linear blending with alpha = wm_channels / wm_latent_dim, as the reference's default.
  return (audio + (config.wm_channels / config.wm_latent_dim) * h)[..., 0]


_encode_jit = jax.jit(encode, static_argnames="config")
_decode_jit = jax.jit(decode, static_argnames="config")


class DacvaeCodec:
  """The `Codec` over converted DACVAE weights (see `dacvae_convert`).

  `encode` pads the audio on the right to a multiple of the hop by reflection, as the reference does; `decode`
  returns T * hop samples. Both run jitted (one compilation per input length).
  """

  name = "dacvae"

  def __init__(self, weights_path: str | os.PathLike, message: Sequence[int] | None = None):
    config, params = load_dacvae(weights_path)
    self._init(config, params, message)

  @classmethod
  def from_params(cls, config: DacvaeConfig, params: Mapping[str, np.ndarray],
                  message: Sequence[int] | None = None) -> DacvaeCodec:
    """A codec over in-memory folded params (checked against `param_shapes(config)`)."""
    check_shapes(params, param_shapes(config), "DACVAE params")
    codec = cls.__new__(cls)
    codec._init(config, params, message)
    return codec

  def _init(self, config, params, message):
    self.config = config
    self.sample_rate = config.sample_rate
    self.frame_rate = config.frame_rate
    self.latent_dim = config.codebook_dim
    self.params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    bits = np.zeros(config.nbits, np.int32) if message is None else np.asarray(message, np.int32)
    if bits.shape != (config.nbits,) or not np.isin(bits, (0, 1)).all():
      raise ValueError(f"watermark message must be {config.nbits} bits of 0/1, got {message!r}")
    self.message = jnp.asarray(bits)
    self._pad_latent = None

  def encode(self, audio: np.ndarray) -> np.ndarray:
    """Mono audio [N] at `sample_rate` -> latents [ceil(N / hop), latent_dim]."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1 or audio.shape[0] == 0:
      raise ValueError(f"DACVAE encode wants non-empty mono audio [N], got shape {audio.shape}")
    hop = self.config.hop_length
    right = -audio.shape[0] % hop
    if right:
      audio = np.pad(audio, (0, right), mode="reflect")
    latents = _encode_jit(self.params, jnp.asarray(audio)[None], config=self.config)
    return np.asarray(latents[0])

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """Latents [T, latent_dim] -> audio [T * hop]."""
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 2 or latents.shape[1] != self.latent_dim or latents.shape[0] == 0:
      raise ValueError(f"DACVAE decode wants latents [T, {self.latent_dim}] with T > 0, got {latents.shape}")
    audio = _decode_jit(self.params, jnp.asarray(latents)[None], config=self.config, message=self.message)
    return np.asarray(audio[0])

  @property
  def pad_latent(self) -> np.ndarray:
    """The encoding of digital silence: the middle frame of one encoded second of zeros (away from the
    zero-padded edges of the conv stack). Computed once per codec."""
    if self._pad_latent is None:
      frames = self.encode(np.zeros(self.sample_rate, np.float32))
      self._pad_latent = frames[frames.shape[0] // 2]
    return self._pad_latent

