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
  speech ends and the data pipeline pads targets with it.
  """

  sample_rate: int
  frame_rate: float
  latent_dim: int

  def encode(self, audio: np.ndarray) -> np.ndarray: ...

  def decode(self, latents: np.ndarray) -> np.ndarray: ...

  @property
  def pad_latent(self) -> np.ndarray: ...
