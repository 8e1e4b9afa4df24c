"""The `mel` codec: normalised log-mel frames, inverted with Griffin-Lim (DESIGN §9).

It needs no downloaded weights and matches DACVAE's frame rate and latent size, so the demo and the tests exercise
exactly the model shapes a real run uses.

Parameters:
  sample rate   24 000 Hz mono
  STFT          n_fft 2048, Hann window of 2048 samples, hop 960 (25 frames/s), centred frames (librosa's
                `center=True`, zero padding): frame t covers samples around t * 960
  mel           128 bands, 0 Hz to 12 000 Hz (Nyquist), Slaney scale and area normalisation (librosa defaults),
                on the power spectrogram
  latent        (ln(mel_power + 1e-5) - LOG_MEAN) / LOG_STD with LOG_MEAN = -5, LOG_STD = 4: the log-mel of eSpeak
                speech (whole utterances, peak ~0.8) has mean -4.9 and std 3.9; the demo corpus's latents come out
                at mean 0.02, std 0.95
  frames        T = ceil(N / 960) for N samples (audio is zero-padded up to T * 960 first)
  pad latent    digital silence: ln(1e-5) normalised, -1.628 in every band
  decode        undo the normalisation, non-negative least squares from mel to a linear magnitude spectrogram
                (`librosa.feature.inverse.mel_to_stft`), then 32 iterations of fast Griffin-Lim starting from zero
                phase, so decoding is deterministic; output length T * 960 samples.

A hop of 960 against a 2048 window overlaps frames by only half, which limits Griffin-Lim; finer internal hops with
frame pooling were tried and reconstructed worse (higher log-spectral distance), so the STFT runs at the latent rate.
"""

from __future__ import annotations

import librosa
import numpy as np

SAMPLE_RATE = 24_000
HOP_LENGTH = 960
N_FFT = 2048
N_MELS = 128
F_MIN = 0.0
F_MAX = 12_000.0
POWER_FLOOR = 1e-5
LOG_MEAN = -5.0
LOG_STD = 4.0
GRIFFIN_LIM_ITERS = 32


def num_frames(num_samples: int) -> int:
  """Latent frames for `num_samples` samples at 24 kHz: ceil(num_samples / 960)."""
  return -(-num_samples // HOP_LENGTH)


class MelCodec:
  """Log-mel codec at 24 kHz, 25 frames/s, 128 dims; follows the `Codec` protocol."""

  name: str = "mel"
  sample_rate: int = SAMPLE_RATE
  frame_rate: float = SAMPLE_RATE / HOP_LENGTH
  latent_dim: int = N_MELS

  def __init__(self, griffin_lim_iters: int = GRIFFIN_LIM_ITERS):
    self.griffin_lim_iters = griffin_lim_iters
    self._mel_basis = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX)

  def params(self) -> dict[str, float | int | str]:
    """Everything that determines the latents, for manifests and configs."""
    return {
        "name": "mel", "sample_rate": SAMPLE_RATE, "hop_length": HOP_LENGTH, "n_fft": N_FFT, "window": "hann",
        "n_mels": N_MELS, "f_min": F_MIN, "f_max": F_MAX, "power_floor": POWER_FLOOR, "log_mean": LOG_MEAN,
        "log_std": LOG_STD,
    }

  def encode(self, audio: np.ndarray) -> np.ndarray:
    """Mono float32 audio [N] at 24 kHz -> float32 latents [ceil(N / 960), 128]."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
      raise ValueError(f"MelCodec.encode takes mono audio [samples], got shape {audio.shape}")
    if audio.size == 0:
      raise ValueError("MelCodec.encode got empty audio")
    if not np.all(np.isfinite(audio)):
      raise ValueError("MelCodec.encode got NaN or infinite samples")
    frames = num_frames(audio.size)
    # Zeros past the end change nothing (centred frames are zero-padded anyway) and spare librosa inputs shorter
    # than one window.
    audio = np.pad(audio, (0, max(frames * HOP_LENGTH, N_FFT) - audio.size))
    spectrum = np.abs(librosa.stft(audio, n_fft=N_FFT, hop_length=HOP_LENGTH, window="hann", center=True)) ** 2
    mel = self._mel_basis @ spectrum[:, :frames]
    return ((np.log(mel + POWER_FLOOR) - LOG_MEAN) / LOG_STD).T.astype(np.float32)

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """Latents [T, 128] -> float32 audio [T * 960] at 24 kHz (Griffin-Lim; deterministic)."""
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 2 or latents.shape[1] != N_MELS or latents.shape[0] == 0:
      raise ValueError(f"MelCodec.decode takes latents [T>0, {N_MELS}], got shape {latents.shape}")
    if not np.all(np.isfinite(latents)):
      raise ValueError("MelCodec.decode got NaN or infinite latents")
    frames = latents.shape[0]
    mel = np.maximum(np.exp(latents.T * LOG_STD + LOG_MEAN) - POWER_FLOOR, 0.0)
    # A centred STFT of T * 960 samples has T + 1 frames; the last one straddles the end, so it repeats frame T-1.
    mel = np.concatenate([mel, mel[:, -1:]], axis=1)
    magnitude = librosa.feature.inverse.mel_to_stft(
        mel, sr=SAMPLE_RATE, n_fft=N_FFT, power=2.0, fmin=F_MIN, fmax=F_MAX
    )
    audio = librosa.griffinlim(
        magnitude, n_iter=self.griffin_lim_iters, hop_length=HOP_LENGTH, n_fft=N_FFT, window="hann", center=True,
        init=None, length=frames * HOP_LENGTH,
    )
    return audio.astype(np.float32)

  @property
  def pad_latent(self) -> np.ndarray:
    """The latent of digital silence, [128] float32."""
    return np.full((N_MELS,), (np.log(POWER_FLOOR) - LOG_MEAN) / LOG_STD, np.float32)
