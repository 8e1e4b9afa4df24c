"""Training-time samples (DESIGN §7): every N steps, speech for a few held-out texts in the run directory.

    samples/step_{N}/{i}.wav   the generated speech (cropped at its end)
    samples/step_{N}/{i}.png   its spectrogram (PIL; no plotting library needed)
    samples/step_{N}/{i}.txt   the normalised text

Process 0 generates; the other processes only take part in gathering the parameters. A failure to generate or
write is logged as a `sample_error` event and never stops training; a failure of the gather, a collective, does.
Each file appears under its final name only when complete.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from collections.abc import Sequence

import jax
import librosa
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from echo_jax import storage
from echo_jax.codecs import Codec
from echo_jax.codecs import audio as audio_lib
from echo_jax.data.cache import ShardCache
from echo_jax.data.shards import iter_shard, list_shards
from echo_jax.sampling import SamplerConfig
from echo_jax.synthesis import Synthesizer
from echo_jax.train.loop import Hook, StepInfo

SPECTROGRAM_HEIGHT = 256
DYNAMIC_RANGE_DB = 80.0


@dataclasses.dataclass(frozen=True)
class SampleExample:
  text: str
  speaker: np.ndarray | None  # reference latents [Ts, D], or None for no reference


def examples_from_shards(shards: str, count: int, latent_dim: int, *, stall_timeout: float = 120.0,
                         retries: int = 3) -> list[SampleExample]:
  """The first `count` valid samples of `shards` (texts and their references), e.g. the held-out shards. Remote
  shards are fetched through a ShardCache in a temporary directory, so that a stalled download times out and is
  retried (`stall_timeout`, `retries`) instead of holding up the launch."""
  examples = []
  with tempfile.TemporaryDirectory(prefix="echo_examples_") as directory:
    cache = ShardCache(directory, prefetch=0, stall_timeout=stall_timeout, retries=retries)
    try:
      for url in list_shards(shards):
        path = cache.fetch(url)
        if path is None:
          continue
        for sample in iter_shard(path, lambda *_: None, latent_dim=latent_dim):
          examples.append(SampleExample(sample.text, np.asarray(sample.ref, np.float32)))
          if len(examples) == count:
            return examples
        cache.release(url)
    finally:
      cache.close()
  return examples


def spectrogram_image(audio: np.ndarray, sample_rate: int) -> Image.Image:
  """A log-magnitude spectrogram (low frequencies at the bottom, 80 dB range) as a grayscale image."""
  n_fft = max(64, int(2 ** np.ceil(np.log2(sample_rate * 0.04))))  # about 40 ms windows
  padded = np.pad(np.asarray(audio, np.float32), (0, max(0, n_fft - audio.size)))
  magnitude = np.abs(librosa.stft(padded, n_fft=n_fft, hop_length=n_fft // 4))
  db = 20 * np.log10(np.maximum(magnitude, 1e-10))
  db = np.clip(db - db.max() + DYNAMIC_RANGE_DB, 0.0, DYNAMIC_RANGE_DB) / DYNAMIC_RANGE_DB
  image = Image.fromarray(np.flipud(db * 255).astype(np.uint8), mode="L")
  return image.resize((max(64, image.width), SPECTROGRAM_HEIGHT), Image.Resampling.BILINEAR)


def write_sample(directory: str, index: int, text: str, audio: np.ndarray, sample_rate: int) -> None:
  """{index}.wav, {index}.png and {index}.txt in `directory` (local or gs://)."""
  audio_lib.write_wav(storage.join(directory, f"{index}.wav"), audio, sample_rate)
  png = io.BytesIO()
  spectrogram_image(audio, sample_rate).save(png, format="PNG")
  storage.write_bytes(storage.join(directory, f"{index}.png"), png.getvalue())
  storage.write_bytes(storage.join(directory, f"{index}.txt"), (text + "\n").encode("utf-8"))


def make_sample_hook(codec: Codec, examples: Sequence[SampleExample], sampler: SamplerConfig | None = None,
                     duration: float | None = None, seed: int = 0) -> Hook:
  """A Trainer hook writing samples of `examples` to `samples/step_{N}/`; use as `hooks=((every, hook),)`.

  duration: seconds generated per text; by default the longest target the config trains on.
  """
  sampler = sampler or SamplerConfig(steps=16)

  def hook(info: StepInfo) -> None:
    trainer = info.trainer
    # A collective: every process joins, only process 0 uses the result. Its failure is not caught: a process that
    # failed it and trained on would meet the others in different collectives (a hang, or a mismatch).
    if jax.process_count() > 1:
      params = multihost_utils.process_allgather(info.state.params, tiled=True)
    else:
      params = jax.device_get(info.state.params)
    if not trainer.is_main:
      return
    try:
      synthesizer = Synthesizer(trainer.config, params, codec)
      seconds = duration or trainer.config.data.max_frames / codec.frame_rate
      relative = f"samples/step_{info.step}"
      for index, example in enumerate(examples):
        result = synthesizer.synthesize(example.text, example.speaker, sampler, seconds, seed + index)
        write_sample(storage.join(trainer.workdir, relative), index, " ".join(result.chunks), result.audio,
                     result.sample_rate)
      trainer.log.event("samples_written", step=info.step, directory=relative, count=len(examples))
    except Exception as error:  # noqa: BLE001 - samples are a by-product; training must go on
      trainer.log.event("sample_error", step=info.step, message=f"{type(error).__name__}: {error}")

  return hook
