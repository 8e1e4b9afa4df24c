"""Waveform I/O shared by codecs, the data builders and inference.

Every path from an audio file (or a synthesiser's output) to a codec goes through `prepare_audio`, so training data
and inference references are resampled, mixed to mono, peak-limited and capped the same way.
"""

from __future__ import annotations

import io
import os

import numpy as np
import soundfile
import soxr

from echo_jax import storage


def to_mono(audio: np.ndarray) -> np.ndarray:
  """Averages the channels of `audio` ([N] or [N, C], soundfile's layout) into float32 [N]."""
  audio = np.asarray(audio, np.float32)
  if audio.ndim == 1:
    return audio
  if audio.ndim == 2:
    return audio.mean(axis=1, dtype=np.float32)
  raise ValueError(f"audio must be [samples] or [samples, channels], got shape {audio.shape}")


def resample(audio: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
  """Resamples mono `audio` from `orig_rate` to `target_rate` Hz with soxr (high quality, deterministic)."""
  if orig_rate <= 0 or target_rate <= 0:
    raise ValueError(f"sample rates must be positive, got {orig_rate} -> {target_rate}")
  audio = np.asarray(audio, np.float32)
  if orig_rate == target_rate:
    return audio
  return soxr.resample(audio, orig_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def peak_limit(audio: np.ndarray, peak: float = 1.0) -> np.ndarray:
  """Scales `audio` down so its largest magnitude is at most `peak`; quieter audio is left as it is.

  Scaling rather than clipping keeps the waveform's shape (clipping adds distortion the codec would learn).
  """
  audio = np.asarray(audio, np.float32)
  largest = float(np.max(np.abs(audio))) if audio.size else 0.0
  if largest > peak:
    audio = audio * np.float32(peak / largest)
  return audio


def cap_length(audio: np.ndarray, sample_rate: int, max_seconds: float | None) -> np.ndarray:
  """Keeps at most the first `max_seconds` of `audio` (all of it when `max_seconds` is None)."""
  if max_seconds is None:
    return audio
  if max_seconds <= 0:
    raise ValueError(f"max_seconds must be positive, got {max_seconds}")
  return audio[: int(round(max_seconds * sample_rate))]


def prepare_audio(
    audio: np.ndarray, orig_rate: int, target_rate: int, max_seconds: float | None = None
) -> np.ndarray:
  """Mono, resampled to `target_rate`, peak-limited to 1 and capped to `max_seconds`: what a codec expects."""
  audio = to_mono(audio)
  if not np.all(np.isfinite(audio)):
    raise ValueError("audio contains NaN or infinite samples")
  audio = cap_length(audio, orig_rate, max_seconds)
  return peak_limit(resample(audio, orig_rate, target_rate))


def load_audio(path: str, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
  """Reads an audio file (wav, flac, ogg, mp3, ... as libsndfile reads them) as `prepare_audio` output."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"audio file not found: {path}")
  try:
    info = soundfile.info(path)
    frames = -1 if max_seconds is None else int(round(max_seconds * info.samplerate))
    audio, orig_rate = soundfile.read(path, frames=frames, dtype="float32", always_2d=False)
  except soundfile.LibsndfileError as error:
    raise ValueError(f"cannot decode audio file {path}: {error}") from error
  if audio.size == 0:
    raise ValueError(f"audio file {path} holds no samples")
  return prepare_audio(audio, orig_rate, sample_rate, max_seconds)


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
  """Writes mono `audio` as 16-bit PCM wav to `path` (local or gs://), which shows the file only once complete."""
  audio = np.asarray(audio, np.float32)
  if audio.ndim != 1:
    raise ValueError(f"write_wav takes mono audio [samples], got shape {audio.shape}")
  if not np.isfinite(audio).all():  # clipped and cast, NaN would be written as full-scale noise
    raise ValueError(f"the audio for {path} holds non-finite values (NaN or inf); nothing was written")
  wav = io.BytesIO()
  soundfile.write(wav, np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
  storage.write_bytes(path, wav.getvalue())
