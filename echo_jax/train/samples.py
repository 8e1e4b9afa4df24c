"""Training-time samples (DESIGN §7): every N steps, speech for a few held-out texts in the run directory.

    samples/step_{N}/{i}.wav   the generated speech (cropped at its end)
    samples/step_{N}/{i}.png   its spectrogram (PIL; no plotting library needed)
    samples/step_{N}/{i}.txt   the normalised text

Process 0 generates; the other processes only take part in gathering the parameters. Process 0 alone reads the
held-out examples too (`HeldOutExamples`), in the background from the launch on. A failure to read the examples, to
generate or to write is logged as a `sample_error` event and never stops training; the next sample step tries again. A
failure of the gather, a collective, stops it. Each file appears under its final name only when complete.
"""

from __future__ import annotations

import dataclasses
import io
import math
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import librosa
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from echo_jax import storage
from echo_jax.background import InBackground
from echo_jax.codecs import Codec
from echo_jax.codecs import audio as audio_lib
from echo_jax.data.cache import ShardCache, describe
from echo_jax.data.shards import iter_shard, list_shards
from echo_jax.sampling import SamplerConfig
from echo_jax.synthesis import Synthesizer, default_duration
from echo_jax.train.loop import Hook, StepInfo

SPECTROGRAM_HEIGHT = 256
DYNAMIC_RANGE_DB = 80.0
# The most a sample step waits for held-out examples still being read. The other processes wait meanwhile in the next
# step's collective, and the hang watchdog (train.hang_timeout) counts it; a read of a shard that stalls can take
# data.download_retries × data.stall_timeout (16 minutes by default).
EXAMPLES_WAIT = 60.0


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


class HeldOutExamples:
  """`read()` (e.g. `examples_from_shards` of the held-out shards), once, in a daemon thread of its own
  (`background.InBackground`) that `start` (or the first `result`) starts. Process 0 starts it at the launch, so that
  its first sample step finds the examples read; the other processes, which generate nothing, never start it. A daemon:
  a read stalled in a listing or a download must not hold the exit of a process whose run ended without needing it."""

  def __init__(self, read: Callable[[], list[SampleExample]]):
    self._read = read
    self._reading = InBackground("sample_examples", read, daemon=True)

  def start(self) -> None:
    self._reading.start()

  def result(self, timeout: float) -> list[SampleExample]:
    """The examples, waiting up to `timeout` seconds for the read; raises its error, or TimeoutError when it is still
    under way (it goes on: the next call waits for it again). A read that failed is started again by the next call,
    so that a passing failure (the Hub's rate limit) costs one sample step, as a failure to generate does."""
    try:
      return self._reading.result(timeout)
    except Exception as error:
      if not self._reading.done():  # not the read's own error (which may be a TimeoutError of the network's)
        raise TimeoutError(f"the held-out examples were still being read after {timeout:g} s; the next sample step "
                           "waits for them again") from None
      self._reading = InBackground("sample_examples", self._read, daemon=True)
      raise RuntimeError(f"reading the held-out examples failed: {describe(error)}") from error


def gather_params(params: Any, *, keep: bool) -> Any:
  """The whole parameters, gathered from every process, as numpy arrays on this host when `keep` (process 0), else
  None. A collective: every process calls it with the same tree and gathers its leaves in the same order, one at a
  time.

  What JAX 0.10.2's `process_allgather(x, tiled=True)` does with an array that spans processes: it jits an identity
  to a replicated sharding, a copy of the whole array on every device, and returns `np.asarray` of device 0's copy:
  numpy, on the host. Over a tree it does so leaf by leaf and each replicated copy is released once its leaf is
  returned (on TPU and GPU `np.asarray` copies to the host; on CPU it is a view of device 0's copy, host memory there,
  which the result keeps). So the extra device memory is one array's replicated copy at a time: at most the largest
  array (a stacked MLP kernel: 0.62 GB in fp32 for the 1.3B config, 1.16 GB for base_fish), which the launch's memory
  check does not count. Gathered here leaf by leaf, that bound is ours, not a detail of how a JAX version maps a
  tree; and the other processes drop each leaf at once instead of holding the whole tree (5.2 GB for the 1.3B config,
  9.5 GB for base_fish) until the last leaf arrives."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  gathered = []
  for leaf in leaves:
    host = multihost_utils.process_allgather(leaf, tiled=True)
    if keep:
      gathered.append(host)
  return jax.tree_util.tree_unflatten(tree, gathered) if keep else None


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


def make_sample_hook(codec: Codec, examples: Sequence[SampleExample] | HeldOutExamples,
                     sampler: SamplerConfig | None = None, duration: float | None = None, seed: int = 0) -> Hook:
  """A Trainer hook writing samples of `examples` to `samples/step_{N}/`; use as `hooks=((every, hook),)`. Only
  process 0 reads `examples` (a `HeldOutExamples` there is waited for up to EXAMPLES_WAIT seconds).

  duration: seconds generated per text; by default the longest target the config trains on.
  """
  sampler = sampler or SamplerConfig(steps=16)

  def hook(info: StepInfo) -> None:
    trainer = info.trainer
    # A collective: every process joins, only process 0 keeps the result. Its failure is not caught: a process that
    # failed it and trained on would meet the others in different collectives (a hang, or a mismatch).
    if jax.process_count() > 1:
      params = gather_params(info.state.params, keep=trainer.is_main)
    else:
      params = jax.device_get(info.state.params)
    if not trainer.is_main:
      return
    try:
      listed = examples.result(EXAMPLES_WAIT) if isinstance(examples, HeldOutExamples) else examples
      synthesizer = Synthesizer(trainer.config, params, codec)
      seconds = duration or default_duration(trainer.config, codec, longest=math.inf)  # the training window
      relative = f"samples/step_{info.step}"
      for index, example in enumerate(listed):
        # Held-out references are whole recordings: cut to the training length quietly, not with a warning each time.
        speaker = None if example.speaker is None else synthesizer.speaker_latents(example.speaker, warn=False)
        result = synthesizer.synthesize(example.text, speaker, sampler, seconds, seed + index)
        write_sample(storage.join(trainer.workdir, relative), index, " ".join(result.chunks), result.audio,
                     result.sample_rate)
      trainer.log.event("samples_written", step=info.step, directory=relative, count=len(listed))
    except Exception as error:  # noqa: BLE001 - samples are a by-product; training must go on
      trainer.log.event("sample_error", step=info.step, message=f"{type(error).__name__}: {error}")

  return hook
