"""Audio codecs: waveforms to latent frames and back.

Every codec follows `Codec`; `get_codec(name)` builds one by its config name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Codec(Protocol):
  """Audio <-> latents at a fixed frame rate.

  `encode` takes mono float32 audio [N] at `sample_rate` and returns float32 latents [T, latent_dim];
  `decode` is the inverse. `pad_latent` [latent_dim] is the encoding of silence: the model emits it after
  speech ends and the data pipeline pads targets with it. `name` is the one a config gives it (`config.codec`).
  """

  name: str
  sample_rate: int
  frame_rate: float
  latent_dim: int

  def encode(self, audio: np.ndarray) -> np.ndarray: ...

  def decode(self, latents: np.ndarray) -> np.ndarray: ...

  @property
  def pad_latent(self) -> np.ndarray: ...


# Every name a config's `codec` may hold; only the first two can be spoken here ("fish_pca": upstream's latents;
# "none": test configs, no audio).
NAMES = ("mel", "dacvae", "fish_pca", "none")


def get_codec(name: str, weights: str | None = None) -> Codec:
  """The codec a config names (`config.codec`): "mel" (no weights) or "dacvae" (converted weights file)."""
  if name == "mel":
    from echo_jax.codecs.mel import MelCodec  # noqa: PLC0415 — librosa loads only when the mel codec is used

    return MelCodec()
  if name == "dacvae":
    if not weights:
      raise ValueError("the dacvae codec needs its weights: convert the published weights.pth with "
                       "`python -m echo_jax.codecs.dacvae_convert weights.pth --out dacvae.safetensors` and pass "
                       "that file (inference: --codec_weights; training: --config.codec_weights)")
    from echo_jax.codecs.dacvae import DacvaeCodec  # noqa: PLC0415

    return DacvaeCodec(weights)
  if name == "fish_pca":
    raise ValueError("the fish_pca codec (Fish-S1-DAC + PCA, the latents of upstream's echo_base_fish) is not "
                     "implemented here: such a checkpoint can be fine-tuned and exported (python -m echo_jax.convert "
                     "export) but not spoken; speak the exported file with upstream Echo")
  if name == "none":
    raise ValueError("the config names no codec (codec='none', as test configs do), so its latents cannot be spoken: "
                     "pass the codec its shards were encoded with (inference: --codec mel or --codec dacvae)")
  raise ValueError(f"unknown codec {name!r}; known: 'mel', 'dacvae'")
