"""Text (+ a reference voice) to speech with a trained Echo checkpoint: the library behind `inference.py`.

    text ─► chunks (≤ 300 chars, ≤ max_text_len bytes normalised, sentence > clause > word) ─► bytes
    reference audio ─► mono, codec rate, peak-limited, ≤ 5 min ─► codec.encode ─► speaker latents, the middle
        config.data.max_ref_frames of them
    chunks in batches of ≤ 8 ─► sampling.sample ─► per chunk: codec.decode of the window ─► audio cut at the end of
        speech ─► concatenate

Every bad input (empty text, unreadable or silent reference, a codec other than the one the checkpoint was trained
with, or whose latent size differs from the checkpoint's) raises `SynthesisError` before anything is written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from echo_jax import checkpoint, codecs, sampling, storage
from echo_jax import text as text_lib
from echo_jax.codecs import Codec
from echo_jax.codecs import audio as audio_lib
from echo_jax.config import model_config
from echo_jax.sampling import SamplerConfig
from echo_jax.train.loop import load_pad_latent

MAX_CHUNK_CHARS = 300
MAX_REFERENCE_SECONDS = 300.0
# Chunks generated at once. The memory of a generation grows with its batch: each chunk holds its own copy of every
# layer's context K/V (0.4 GB for echo_1p3b with a 5-minute reference, three times that under independent guidance),
# so a whole chapter in one batch ran out of memory (found by review).
MAX_BATCH_CHUNKS = 8
# The longest window generated, in training windows (config.data.max_frames). Past the training window the model was
# never taught to end speech, and a generation's memory grows with its frames: --duration 100000 warned, loaded
# everything, then died out of memory with a traceback (found by review). Four windows (102 s for the base config's
# 25.6 s) are four times the longest speech a 300-character chunk holds, room to try a longer window, while a typo
# or a whole text's length meant for one chunk is refused before anything is loaded.
MAX_TRAINING_WINDOWS = 4
# A reference whose peak is below -80 dBFS holds no voice to clone (digital silence or a broken recording).
SILENT_PEAK = 1e-4
# Seeds are [0, 2**32): JAX (x64 off) keeps a seed's low 32 bits, so seed 2**32 gave seed 0's audio and -1 that of
# 2**32 - 1, and a seed of 2**64 or more failed after the checkpoint's load (found by review).
SEED_LIMIT = 2**32
PRESETS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets",
                            "sampler_presets.json")

log = logging.getLogger(__name__)


class SynthesisError(ValueError):
  """Bad input to synthesis; the message names the problem."""


@dataclasses.dataclass
class SynthesisResult:
  """The generated speech and what it took."""

  audio: np.ndarray  # float32 [samples]
  sample_rate: int
  chunks: list[str]  # the normalised text of each chunk
  latents: list[np.ndarray]  # per chunk, cropped at its end of speech [T_i, D]
  generation_seconds: float  # text to audio, compilation included

  @property
  def seconds(self) -> float:
    return self.audio.size / self.sample_rate

  @property
  def real_time_factor(self) -> float:
    """Wall time per second of audio (below 1 is faster than real time)."""
    return self.generation_seconds / max(self.seconds, 1e-9)


def load_preset(name: str, path: str = PRESETS_PATH) -> SamplerConfig:
  """The sampler preset `name` of the presets file."""
  presets = sampling.load_presets(path)
  if name not in presets:
    raise SynthesisError(f"unknown preset {name!r}; {path} has {sorted(presets)}")
  return presets[name]


def check_seed(seed: int) -> None:
  """Raises SynthesisError unless `seed` is an integer in [0, SEED_LIMIT)."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < SEED_LIMIT:
    raise SynthesisError(f"seed must be an integer from 0 to {SEED_LIMIT - 1} (the noise key holds 32 bits: other "
                         f"seeds would repeat one of these), got {seed!r}")


def split_and_normalize(text: str, max_text_len: int = text_lib.MAX_TEXT_LEN) -> list[str]:
  """Long text -> normalised chunks of at most `MAX_CHUNK_CHARS` characters before normalisation and `max_text_len`
  tokens after (`text.chunk_text`: a turn running over a chunk boundary keeps its speaker)."""
  if not isinstance(text, str) or not text.strip():
    raise SynthesisError("text is empty: nothing to say")
  try:
    return text_lib.chunk_text(text, max_text_len, MAX_CHUNK_CHARS)
  except ValueError as error:
    raise SynthesisError(f"the model's text length ({max_text_len} tokens) is too short for this text: "
                         f"{error}") from error


def check_codec(config: ml_collections.ConfigDict, name: str | None) -> None:
  """Raises SynthesisError unless the codec named `name` speaks the latents of a model trained with `config`: the
  one the config names (`config.codec`), or any where it names none ("none", as test configs do)."""
  trained = config.get("codec", "dacvae")
  if trained != "none" and name != trained:
    # mel and dacvae both make 128-d latents at 25 frames/s: decoded by the other codec, a model's latents passed
    # every check and were written as noise (found by review).
    raise SynthesisError(f"the checkpoint was trained on {trained} latents (its config.codec={trained!r}); the {name} "
                         f"codec cannot speak them: leave out --codec, or give --codec {trained}")


def codec_for(config: ml_collections.ConfigDict, name: str | None = None, weights: str | None = None) -> Codec:
  """The codec that speaks the latents of a model trained with `config`: the one it names, or `name`
  (`check_codec`, asked before the codec's weights are read)."""
  name = name or config.get("codec", "dacvae")
  check_codec(config, name)
  return codecs.get_codec(name, weights)


def default_duration(config: ml_collections.ConfigDict, codec: Codec, longest: float = 15.0) -> float:
  """`longest` seconds, or the training window when shorter: a model never trained to stop later won't."""
  return min(longest, config.data.max_frames / codec.frame_rate)


def window_frames(config: ml_collections.ConfigDict, codec: Codec, duration: float) -> int:
  """Latent frames for `duration` seconds, refused with SynthesisError when not positive or longer than
  MAX_TRAINING_WINDOWS training windows. It does not warn of a window longer than the training window:
  `Synthesizer.frames_for` does, once per generation, and a caller that checks the duration early (inference.py)
  would have had it printed twice (found by review)."""
  if not 0 < duration < math.inf:  # NaN fails this too
    raise SynthesisError(f"duration must be a positive number of seconds, got {duration}")
  frames = max(1, int(round(duration * codec.frame_rate)))
  window = config.data.max_frames
  if frames > MAX_TRAINING_WINDOWS * window:
    raise SynthesisError(
        f"duration {duration:g} s ({frames} latent frames) is more than {MAX_TRAINING_WINDOWS} times the "
        f"{window / codec.frame_rate:g} s ({window} frames, config.data.max_frames) the model trained on: give at "
        f"most {MAX_TRAINING_WINDOWS * window / codec.frame_rate:g} s (inference.py --duration); a longer text is "
        "split into chunks, each generated in a window of its own")
  return frames


class Synthesizer:
  """A model (config + params) and a codec, ready to turn text into audio."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, codec: Codec):
    check_codec(config, codec.name)  # also for a codec built elsewhere (`codec_for` asks it before the build)
    if config.model.latent_dim != codec.latent_dim:
      raise SynthesisError(f"the checkpoint's model has latent_dim={config.model.latent_dim} but the codec "
                           f"{type(codec).__name__} has latent_dim={codec.latent_dim}: they were not trained together")
    self.config = config
    self.cfg = model_config(config)
    self.params = params
    self.codec = codec
    self.pad_latent = self._pad_latent()
    self._progress: tqdm | None = None

  @classmethod
  def from_checkpoint(cls, path: str, codec: Codec | str | None = None,
                      codec_weights: str | None = None) -> Synthesizer:
    """From a run directory, an Orbax step directory, a parameters directory or a pickle, local or on gs://
    (`checkpoint.load_params`, which raises FileNotFoundError when nothing is at `path`).

    codec: a codec, or the name of one (`codec_for`), or None for the one the checkpoint's config names. The codec is
    built before the parameters are read, so that a codec that cannot be used is refused before their load.
    """
    config = checkpoint.load_config(path)
    if codec is None or isinstance(codec, str):
      codec = codec_for(config, codec, codec_weights)
    _, params = checkpoint.load_params(path, config)
    return cls(config, params, codec)

  def _pad_latent(self) -> np.ndarray:
    """The silence latent the model was trained to emit: the config's pad file, zeros when it names none."""
    path = self.config.data.pad_latent
    if path and not storage.exists(path):
      log.warning("pad latent %s of the training config is not here; using the codec's silence latent", path)
      return np.asarray(self.codec.pad_latent, np.float32)
    return load_pad_latent(path, self.cfg.latent_dim)

  def reference_latents(self, path: str) -> np.ndarray:
    """Speaker latents [Ts, D] of an audio file (read up to 5 minutes of it), as `speaker_latents` gives them."""
    try:
      audio = audio_lib.load_audio(path, self.codec.sample_rate, MAX_REFERENCE_SECONDS)
    except (OSError, ValueError) as error:
      raise SynthesisError(f"cannot read the speaker reference {path}: {error}") from error
    if float(np.max(np.abs(audio))) < SILENT_PEAK:
      raise SynthesisError(f"the speaker reference {path} is silent (peak below {SILENT_PEAK}); give a recording "
                           "of the voice to clone")
    return self.speaker_latents(self.codec.encode(audio), f"the speaker reference {path}")

  def speaker_latents(self, latents: np.ndarray, source: str = "the speaker latents", warn: bool = True) -> np.ndarray:
    """Speaker latents [Ts, D] as training showed them to the model: whole patches (the speaker encoder reads
    patches) and at most config.data.max_ref_frames, the middle of longer ones, cut with a warning unless `warn` is
    False. `source` names them in the error and the warning."""
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 2 or latents.shape[1] != self.cfg.latent_dim:
      raise SynthesisError(f"{source} must be [Ts, {self.cfg.latent_dim}] latents, got shape {latents.shape}")
    patch, given = self.cfg.speaker_patch, latents.shape[0]
    if given < patch:
      raise SynthesisError(f"too short: {source}: {given} latent frames, the speaker encoder needs at least {patch}")
    longest = self.config.data.max_ref_frames
    frames = min(given, longest) // patch * patch
    if given > longest and warn:  # a reference up to 5 minutes long was used whole, never seen in training
      rate = self.codec.frame_rate
      log.warning("%s: cut from %.1f s to the middle %.1f s, the longest reference the model trained on "
                  "(config.data.max_ref_frames=%d frames)", source, given / rate, frames / rate, longest)
    # The middle: training crops each reference at a uniformly drawn start (data/pipeline.py), which is the middle on
    # average, and a recording's edges are where its silence, breaths and cut-off words are.
    start = (given - frames) // 2
    return latents[start:start + frames]

  def frames_for(self, duration: float) -> int:
    """Latent frames for `duration` seconds (`window_frames`); warns beyond the length the model trained on."""
    frames = window_frames(self.config, self.codec, duration)
    if frames > self.config.data.max_frames:
      log.warning("%d frames (%.1f s) is longer than the %d frames the model trained on; quality may suffer",
                  frames, duration, self.config.data.max_frames)
    return frames

  def _on_step(self, step: Any) -> None:
    if self._progress is not None:
      self._progress.update(1)

  def generate_latents(self, chunks: Sequence[str], speaker: np.ndarray | None, sampler: SamplerConfig,
                       frames: int, seed: int, progress: bool = False,
                       max_batch: int = MAX_BATCH_CHUNKS) -> np.ndarray:
    """Latents [len(chunks), frames, D] for normalised chunks with one speaker (or none), generated in batches of at
    most `max_batch` chunks: batch b with the key `fold_in(key(seed), b)`. When there are several, the last is filled
    up to `max_batch` with its last chunk again (its rows dropped): a batch of another size compiled the sampler a
    second time (a model's whole sampling loop), and a row's noise does not depend on the batch's size."""
    check_seed(seed)
    max_len = self.config.data.max_text_len
    for chunk in chunks:
      if not text_lib.text_bytes_fit(chunk, max_len):
        log.warning("chunk of %d bytes is cut to the model's %d text tokens: %r", len(chunk.encode()), max_len, chunk)
    batches = [list(chunks[start:start + max_batch]) for start in range(0, len(chunks), max_batch)]
    last = len(batches[-1])
    if len(batches) > 1:
      batches[-1] += batches[-1][-1:] * (max_batch - last)
    self._progress = tqdm(total=sampler.steps * len(batches), desc="sampling", disable=not progress,
                          dynamic_ncols=True)
    try:
      latents = np.concatenate([
          self._generate_batch(batch, speaker, sampler, frames, jax.random.fold_in(jax.random.key(seed), index),
                               progress)
          for index, batch in enumerate(batches)])
      return latents[: len(chunks)]
    finally:
      self._progress.close()
      self._progress = None

  def _generate_batch(self, chunks: Sequence[str], speaker: np.ndarray | None, sampler: SamplerConfig, frames: int,
                      key: jax.Array, progress: bool) -> np.ndarray:
    """Latents [len(chunks), frames, D], the chunks as one batch."""
    encoded = [text_lib.encode_text(chunk, self.config.data.max_text_len) for chunk in chunks]
    text = np.stack([ids for ids, _ in encoded])
    text_mask = np.stack([mask for _, mask in encoded])
    batch = len(chunks)
    if speaker is None:  # no reference: what training's speaker dropout shows the model
      speaker_latents = np.zeros((batch, self.cfg.speaker_patch, self.cfg.latent_dim), np.float32)
      speaker_mask = np.zeros((batch, self.cfg.speaker_patch), bool)
    else:
      speaker_latents = np.broadcast_to(speaker, (batch, *speaker.shape))
      speaker_mask = np.ones((batch, speaker.shape[0]), bool)
    latents = sampling.sample(self.params, self.cfg, sampler, key, text, text_mask, speaker_latents, speaker_mask,
                              frames, on_step=self._on_step if progress else None)
    latents = np.asarray(jax.device_get(latents))
    jax.effects_barrier()
    return latents

  def synthesize(self, text: str, speaker: np.ndarray | None = None, sampler: SamplerConfig | None = None,
                 duration: float | None = None, seed: int = 42, progress: bool = False,
                 max_batch: int = MAX_BATCH_CHUNKS) -> SynthesisResult:
    """Speech for `text` (split, normalised, generated in batches of at most `max_batch` chunks, cropped at each end
    of speech, concatenated).

    speaker: reference latents [Ts, D] (`reference_latents`; cut as `speaker_latents` cuts them), or None for no
    reference.
    duration: seconds generated per chunk; None for `default_duration`.
    """
    start = time.time()
    sampler = sampler or SamplerConfig()
    chunks = split_and_normalize(text, self.config.data.max_text_len)
    frames = self.frames_for(default_duration(self.config, self.codec) if duration is None else duration)
    if speaker is not None:
      speaker = self.speaker_latents(speaker)
    latents = self.generate_latents(chunks, speaker, sampler, frames, seed, progress, max_batch)
    cropped, pieces = [], []
    for index, chunk_latents in enumerate(latents):
      end = sampling.end_of_speech(chunk_latents, self.pad_latent)
      if end == 0:
        raise SynthesisError(f"the model generated only silence for chunk {index} ({chunks[index]!r}); try another "
                             "seed or a stronger text guidance")
      if end == frames:  # no silence at its end: the window ran out mid-speech
        log.warning("chunk %d (%r) did not end in silence within %.1f s: its speech may be cut off; give it a "
                    "longer duration (inference.py --duration)", index, chunks[index], frames / self.codec.frame_rate)
      cropped.append(chunk_latents[:end])
      # The whole window is decoded, then its audio cut at the end of speech (DESIGN §8, as upstream): a decoder's
      # convolutions see past a frame, so the last words decoded alone came out otherwise than within the window; and
      # one window length compiles the decoder once, where each cropped length compiled it again (seconds each).
      audio = np.asarray(self.codec.decode(chunk_latents), np.float32)
      pieces.append(audio[: round(end * self.codec.sample_rate / self.codec.frame_rate)])
    return SynthesisResult(audio=np.concatenate(pieces), sample_rate=self.codec.sample_rate, chunks=chunks,
                           latents=cropped, generation_seconds=time.time() - start)
