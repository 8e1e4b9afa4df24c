"""The mel codec (encode/decode of real eSpeak speech) and the shared audio I/O helpers."""

import os

import librosa
import numpy as np
import pytest
import soundfile

from echo_jax.codecs import Codec
from echo_jax.codecs import audio as audio_lib
from echo_jax.codecs.mel import HOP_LENGTH, MelCodec, num_frames
from echo_jax.data.demo import SPEAKERS, speak

# Griffin-Lim from a 25 frames/s, 128-band mel measures 3.6-5.1 dB on this sentence in the six demo voices (phase
# is lost and frames overlap by only half). A decoder with the right spectral envelope but wrong timing (the
# time-reversed original) measures 8.9-11.3 dB and white noise 17-20 dB, so 7 dB passes a working decoder and fails
# broken ones.
LSD_BOUND_DB = 7.0
SENTENCE = "Hello there, this is a quick test of the mel codec. Can you understand every word?"


@pytest.fixture(scope="module")
def codec():
  return MelCodec()


@pytest.fixture(scope="module")
def speech(codec):
  return speak(SENTENCE, SPEAKERS[0], codec.sample_rate)


def log_spectral_distance(reference: np.ndarray, estimate: np.ndarray) -> float:
  """Mean over frames of the RMS difference (dB) of the power spectra, both floored 60 dB below the reference peak.

  The floor keeps near-silent bins, which are inaudible, from dominating the distance.
  """
  length = min(reference.size, estimate.size)
  ref_power = np.abs(librosa.stft(reference[:length], n_fft=1024, hop_length=256)) ** 2
  est_power = np.abs(librosa.stft(estimate[:length], n_fft=1024, hop_length=256)) ** 2
  floor = ref_power.max() * 1e-6
  difference = 10 * np.log10(np.maximum(ref_power, floor)) - 10 * np.log10(np.maximum(est_power, floor))
  return float(np.mean(np.sqrt(np.mean(difference**2, axis=0))))


def test_follows_codec_protocol(codec):
  assert isinstance(codec, Codec)
  assert codec.sample_rate == 24_000 and codec.frame_rate == 25.0 and codec.latent_dim == 128


def test_round_trip_spectral_distance(codec, speech):
  latents = codec.encode(speech)
  assert latents.dtype == np.float32 and latents.shape == (num_frames(speech.size), 128)
  decoded = codec.decode(latents)
  assert decoded.dtype == np.float32 and decoded.shape == (latents.shape[0] * HOP_LENGTH,)
  distance = log_spectral_distance(speech, decoded)
  assert distance < LSD_BOUND_DB, distance
  # The bound must be able to fail: decoders that lose timing or content exceed it.
  assert log_spectral_distance(speech, decoded[::-1].copy()) > LSD_BOUND_DB
  noise = np.random.default_rng(0).normal(0, 0.05, decoded.size).astype(np.float32)
  assert log_spectral_distance(speech, noise) > LSD_BOUND_DB


def test_decode_is_deterministic(codec, speech):
  latents = codec.encode(speech[: 24_000])
  np.testing.assert_array_equal(codec.decode(latents), codec.decode(latents))


def test_latents_roughly_standardised_on_speech(codec, speech):
  latents = codec.encode(speech)
  assert abs(float(latents.mean())) < 0.5 and 0.6 < float(latents.std()) < 1.5


@pytest.mark.parametrize("num_samples, frames", [(1, 1), (959, 1), (960, 1), (961, 2), (24_000, 25), (48_001, 51)])
def test_frames_are_ceil_of_duration_at_25_fps(codec, num_samples, frames):
  audio = np.random.default_rng(num_samples).normal(0, 0.1, num_samples).astype(np.float32)
  assert codec.encode(audio).shape == (frames, 128)


def test_pad_latent_is_encoded_silence(codec):
  silence = codec.encode(np.zeros(3 * HOP_LENGTH * 10, np.float32))
  assert codec.pad_latent.shape == (128,) and codec.pad_latent.dtype == np.float32
  np.testing.assert_allclose(silence, np.broadcast_to(codec.pad_latent, silence.shape), atol=1e-6)
  # Speech is far from the pad latent, so end-of-speech detection can tell them apart.
  noise = np.random.default_rng(0).normal(0, 0.1, 9600).astype(np.float32)
  assert np.abs(codec.encode(noise) - codec.pad_latent).min() > 1


@pytest.mark.parametrize(
    "audio, message",
    [(np.zeros((2, 100), np.float32), "mono"), (np.zeros(0, np.float32), "empty"), (np.full(10, np.nan), "NaN")],
)
def test_encode_rejects_bad_audio(codec, audio, message):
  with pytest.raises(ValueError, match=message):
    codec.encode(audio)


def test_decode_rejects_bad_latents(codec):
  with pytest.raises(ValueError, match="latents"):
    codec.decode(np.zeros((10, 80), np.float32))


def test_load_audio_mono_resampled_limited_capped(tmp_path):
  rate = 44_100
  t = np.arange(2 * rate) / rate
  stereo = np.stack([1.5 * np.sin(2 * np.pi * 440 * t), 1.5 * np.sin(2 * np.pi * 440 * t)], axis=1)
  path = str(tmp_path / "tone.flac")
  soundfile.write(path, stereo * 0.6, rate)  # 0.9 peak: flac stores [-1, 1]
  audio = audio_lib.load_audio(path, 24_000, max_seconds=1.5)
  assert audio.dtype == np.float32 and audio.ndim == 1
  assert abs(audio.size - 36_000) <= 1
  assert 0.85 < np.abs(audio).max() <= 1.0
  spectrum = np.abs(np.fft.rfft(audio))
  assert abs(np.argmax(spectrum) * 24_000 / audio.size - 440) < 2


def test_prepare_audio_peak_limits_without_clipping():
  loud = np.array([0.5, -3.0, 2.0], np.float32)
  np.testing.assert_allclose(audio_lib.peak_limit(loud), loud / 3.0)
  quiet = np.array([0.1, -0.2], np.float32)
  np.testing.assert_array_equal(audio_lib.peak_limit(quiet), quiet)
  with pytest.raises(ValueError, match="NaN"):
    audio_lib.prepare_audio(np.array([0.0, np.nan]), 16_000, 24_000)


def test_load_audio_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    audio_lib.load_audio(str(tmp_path / "missing.wav"), 24_000)
  junk = tmp_path / "junk.wav"
  junk.write_bytes(b"not audio at all")
  with pytest.raises(ValueError, match="cannot decode"):
    audio_lib.load_audio(str(junk), 24_000)


def test_write_wav_round_trip(tmp_path, speech):
  path = str(tmp_path / "out" / "speech.wav")
  audio_lib.write_wav(path, speech, 24_000)
  assert os.listdir(tmp_path / "out") == ["speech.wav"]
  loaded, rate = soundfile.read(path, dtype="float32")
  assert rate == 24_000 and loaded.shape == speech.shape
  np.testing.assert_allclose(loaded, speech, atol=1 / 16_000)
