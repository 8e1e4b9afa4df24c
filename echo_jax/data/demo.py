"""The demo speech corpus: English sentences spoken by eSpeak NG voices, as mel-codec tar shards (DESIGN §6).

    python -m echo_jax.data.demo --out data/demo

Each sentence of `demo_sentences.txt` is spoken by every speaker (an eSpeak voice variant with its own rate and
pitch). A held-out set of sentences (5%, at least one) goes to `eval-00000.tar`, the rest to `train-{i:05d}.tar`.
A sample's target is the mel latent of one utterance; its reference is the latent of a different utterance by the
same speaker (for eval samples, a training utterance, so eval text and target stay unseen); its text is the
sentence after `normalize_text`, as inference feeds it. Utterances longer than `MAX_FRAMES` are dropped and reported.

The build is deterministic: the same sentences, speakers, seed, codec and eSpeak version give byte-identical shards.
`manifest.json` records those inputs and the shards' hashes; a rerun whose inputs match an intact build does nothing.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import glob
import hashlib
import io
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import espeakng_loader
import numpy as np
import tqdm

from echo_jax import storage
from echo_jax.codecs import audio as audio_lib
from echo_jax.codecs.mel import MelCodec
from echo_jax.data.shards import Sample, write_shard
from echo_jax.text import normalize_text

SENTENCES_PATH = os.path.join(os.path.dirname(__file__), "demo_sentences.txt")
MAX_FRAMES = 250  # 10 s at 25 frames/s: the demo configs' target length.
EVAL_FRACTION = 0.05
MANIFEST_NAME = "manifest.json"
PAD_LATENT_NAME = "pad_latent.npy"

# eSpeak NG API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_EE_OK = 0


@dataclasses.dataclass(frozen=True)
class Speaker:
  name: str  # no dots: it is part of sample keys
  voice: str  # eSpeak voice name, optionally with a "+variant"
  rate: int  # words per minute
  pitch: int  # 0..100, eSpeak's default is 50


SPEAKERS = (
    Speaker("us_f3", "en-us+f3", 165, 60),
    Speaker("us_m1", "en-us", 175, 48),
    Speaker("gb_m3", "en+m3", 170, 40),
    Speaker("rp_f2", "en-gb-x-rp+f2", 160, 55),
    Speaker("us_m7", "en-us+m7", 180, 45),
    Speaker("scot_f4", "en-gb-scotland+f4", 168, 66),
)


class ESpeak:
  """eSpeak NG from the `espeakng-loader` wheel, through ctypes (no Python binding of the C API is maintained).

  The library keeps global state, so one instance per process is shared through `get()`. Its output depends
  slightly on what the process synthesised before (waveform generator state survives calls and even
  `espeak_Terminate`), so reproducible audio needs a fresh process, `set_seed` and a fixed order of calls.
  """

  _instance: ESpeak | None = None

  def __init__(self):
    self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
    self._lib.espeak_Initialize.restype = ctypes.c_int
    self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    self.sample_rate = self._lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
    )
    if self.sample_rate <= 0:
      raise RuntimeError(f"espeak_Initialize failed (returned {self.sample_rate})")
    self._lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
        ctypes.c_void_p, ctypes.c_void_p,
    ]
    self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    self._lib.espeak_Info.restype = ctypes.c_char_p
    self._lib.espeak_Info.argtypes = [ctypes.c_void_p]
    self._lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    self.version = self._lib.espeak_Info(None).decode()
    self._chunks: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    # Held on self: ctypes does not keep the callback alive, and eSpeak would call freed memory.
    self._callback = callback_type(self._on_samples)
    self._lib.espeak_SetSynthCallback(self._callback)

  @classmethod
  def get(cls) -> ESpeak:
    if cls._instance is None:
      cls._instance = ESpeak()
    return cls._instance

  def set_seed(self, seed: int) -> None:
    """Seeds eSpeak's random generator (it adds random variation to some voices)."""
    self._lib.espeak_ng_SetRandSeed(seed)

  def _on_samples(self, wav, num_samples, events) -> int:
    del events
    if num_samples > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
    return 0

  def synthesize(self, text: str, voice: str, rate: int = 175, pitch: int = 50) -> np.ndarray:
    """Speaks `text` with `voice`; returns float32 mono audio at `self.sample_rate` (22 050 Hz)."""
    if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
      raise ValueError(f"eSpeak has no voice {voice!r}")
    self._lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
    self._lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
    data = text.encode("utf-8") + b"\0"
    self._chunks = []
    status = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if status != _EE_OK:
      raise RuntimeError(f"espeak_Synth failed with status {status} for {text!r}")
    self._lib.espeak_Synchronize()
    if not self._chunks:
      raise RuntimeError(f"eSpeak produced no audio for {text!r}")
    return np.concatenate(self._chunks).astype(np.float32) / 32768.0


def speak(text: str, speaker: Speaker, sample_rate: int) -> np.ndarray:
  """`text` spoken by `speaker`, prepared for a codec at `sample_rate` the way inference prepares references."""
  engine = ESpeak.get()
  audio = engine.synthesize(text, speaker.voice, speaker.rate, speaker.pitch)
  return audio_lib.prepare_audio(audio, engine.sample_rate, sample_rate)


def _render_speaker(task: tuple[Speaker, list[str], int]) -> list[tuple[np.ndarray, float]]:
  """(float16 mel latent, duration in s) of each sentence spoken by the speaker, in order.

  Runs in a fresh process per speaker, so the audio depends only on the speaker, its sentences and the seed.
  """
  speaker, sentences, seed = task
  codec = MelCodec()
  ESpeak.get().set_seed(seed)
  rendered = []
  for sentence in sentences:
    audio = speak(sentence, speaker, codec.sample_rate)
    rendered.append((codec.encode(audio).astype(np.float16), round(audio.size / codec.sample_rate, 3)))
  return rendered


def _render(sentences: Sequence[str], speakers: Sequence[Speaker], seed: int,
            progress: bool) -> list[list[tuple[np.ndarray, float]]]:
  """`_render_speaker` for every speaker, each in its own fresh process, a few at a time.

  Workers fork from a forkserver, a process that only imports modules and never synthesises, so each starts with
  pristine eSpeak state; preloading librosa there spares every worker seconds of lazy imports.
  """
  workers = max(1, min(len(speakers), os.cpu_count() or 1))
  tasks = [(speaker, list(sentences), seed) for speaker in speakers]
  context = multiprocessing.get_context("forkserver")
  context.set_forkserver_preload(["librosa.filters", "librosa.core.spectrum", "echo_jax.codecs.mel"])
  with context.Pool(workers, maxtasksperchild=1) as pool:
    return list(tqdm.tqdm(pool.imap(_render_speaker, tasks), total=len(tasks), desc="speakers", disable=not progress))


def read_sentences(path: str = SENTENCES_PATH) -> list[str]:
  with open(path, encoding="utf-8") as stream:
    sentences = [line.strip() for line in stream if line.strip()]
  if len(set(sentences)) != len(sentences):
    raise ValueError(f"{path} repeats sentences; held-out eval sentences must not appear in training")
  return sentences


@dataclasses.dataclass
class _Utterance:
  speaker: str
  sentence_index: int
  sentence: str
  latent: np.ndarray  # float16 [T, D]
  duration: float


def _build_inputs(sentences: Sequence[str], speakers: Sequence[Speaker], codec: MelCodec, seed: int,
                  shard_size: int) -> dict[str, Any]:
  """Everything the shards' bytes depend on; a build is redone only when this changes."""
  return {
      "sentences_sha256": hashlib.sha256("\n".join(sentences).encode("utf-8")).hexdigest(),
      "num_sentences": len(sentences),
      "speakers": [dataclasses.asdict(speaker) for speaker in speakers],
      "codec": codec.params(),
      "espeak_version": ESpeak.get().version,
      "seed": seed,
      "shard_size": shard_size,
      "max_frames": MAX_FRAMES,
      "eval_fraction": EVAL_FRACTION,
  }


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as stream:
    for block in iter(lambda: stream.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _is_up_to_date(out_dir: str, inputs: dict[str, Any]) -> bool:
  path = os.path.join(out_dir, MANIFEST_NAME)
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as stream:
    try:
      manifest = json.load(stream)
    except json.JSONDecodeError:
      return False
  if manifest.get("inputs") != inputs:
    return False
  files = dict(manifest.get("files", {}))
  return all(
      os.path.isfile(os.path.join(out_dir, name)) and _file_sha256(os.path.join(out_dir, name)) == digest
      for name, digest in files.items()
  )


def _pick_refs(keys: Sequence[str], pool: dict[str, list[str]], speakers: dict[str, str],
               rng: np.random.Generator) -> dict[str, str]:
  """For each key, another key of the same speaker drawn from `pool` (speaker -> keys)."""
  refs = {}
  for key in keys:
    candidates = [other for other in pool.get(speakers[key], []) if other != key]
    if not candidates:
      raise ValueError(f"speaker {speakers[key]!r} has no other training utterance to serve as reference for {key}")
    refs[key] = candidates[int(rng.integers(len(candidates)))]
  return refs


def build(out_dir: str, limit: int | None = None, num_speakers: int | None = None, shard_size: int = 500,
          seed: int = 0, sentences_path: str = SENTENCES_PATH, progress: bool = True) -> dict[str, Any]:
  """Builds the demo corpus into `out_dir` unless an intact identical build is already there; returns the manifest.

  `limit` keeps the first `limit` sentences, `num_speakers` the first speakers of `SPEAKERS`.
  """
  if limit is not None and limit < 1:
    raise ValueError(f"limit must be positive, got {limit}")
  if num_speakers is not None and not 1 <= num_speakers <= len(SPEAKERS):
    raise ValueError(f"num_speakers must be between 1 and {len(SPEAKERS)}, got {num_speakers}")
  sentences = read_sentences(sentences_path)[:limit]
  speakers = SPEAKERS[:num_speakers]
  if len(sentences) < 3:
    raise ValueError(f"need at least 3 sentences (2 for training, 1 held out), got {len(sentences)}")
  if shard_size < 1:
    raise ValueError(f"shard_size must be positive, got {shard_size}")
  codec = MelCodec()
  inputs = _build_inputs(sentences, speakers, codec, seed, shard_size)
  if _is_up_to_date(out_dir, inputs):
    with open(os.path.join(out_dir, MANIFEST_NAME), encoding="utf-8") as stream:
      manifest = json.load(stream)
    print(f"demo corpus in {out_dir} is up to date ({manifest['counts']}); nothing to do")
    return manifest

  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(sentences))
  num_eval = max(1, round(EVAL_FRACTION * len(sentences)))
  eval_sentences = {int(i) for i in order[:num_eval]}

  utterances: dict[str, _Utterance] = {}
  dropped = []
  for speaker, rendered in zip(speakers, _render(sentences, speakers, seed, progress), strict=True):
    for index, (latent, duration) in enumerate(rendered):
      key = f"{speaker.name}_{index:04d}"
      if latent.shape[0] > MAX_FRAMES:
        dropped.append({"key": key, "frames": int(latent.shape[0]), "text": sentences[index]})
      else:
        utterances[key] = _Utterance(speaker.name, index, sentences[index], latent, duration)

  def split_keys(held_out: bool) -> list[str]:
    return [key for key, utt in utterances.items() if (utt.sentence_index in eval_sentences) == held_out]

  train_keys, eval_keys = split_keys(False), split_keys(True)
  speaker_of = {key: utt.speaker for key, utt in utterances.items()}
  train_pool: dict[str, list[str]] = {}
  for key in train_keys:
    train_pool.setdefault(speaker_of[key], []).append(key)
  refs = _pick_refs(train_keys, train_pool, speaker_of, rng)
  refs.update(_pick_refs(eval_keys, train_pool, speaker_of, rng))
  train_keys = [train_keys[i] for i in rng.permutation(len(train_keys))]

  def samples(keys: Sequence[str]) -> list[Sample]:
    return [
        Sample(key, utterances[key].latent, utterances[refs[key]].latent, {
            "text": normalize_text(utterances[key].sentence), "speaker": utterances[key].speaker,
            "duration": utterances[key].duration, "ref_key": refs[key],
        })
        for key in keys
    ]

  shard_names = []
  for i, start in enumerate(range(0, len(train_keys), shard_size)):
    shard_names.append(f"train-{i:05d}.tar")
    write_shard(os.path.join(out_dir, shard_names[-1]), samples(train_keys[start:start + shard_size]))
  shard_names.append("eval-00000.tar")
  write_shard(os.path.join(out_dir, shard_names[-1]), samples(eval_keys))
  for stale in glob.glob(os.path.join(out_dir, "train-*.tar")) + glob.glob(os.path.join(out_dir, "eval-*.tar")):
    if os.path.basename(stale) not in shard_names:
      os.remove(stale)
  pad = io.BytesIO()
  np.save(pad, codec.pad_latent, allow_pickle=False)
  storage.write_bytes(os.path.join(out_dir, PAD_LATENT_NAME), pad.getvalue())

  files = {name: _file_sha256(os.path.join(out_dir, name)) for name in [*shard_names, PAD_LATENT_NAME]}
  content = hashlib.sha256("".join(f"{name}:{digest}\n" for name, digest in sorted(files.items())).encode())
  manifest = {
      "inputs": inputs,
      "counts": {"train": len(train_keys), "eval": len(eval_keys), "dropped": len(dropped),
                 "train_sentences": len(sentences) - num_eval, "eval_sentences": num_eval,
                 "speakers": len(speakers)},
      "speakers": [speaker.name for speaker in speakers],
      "dropped": dropped,
      "train_shards": shard_names[:-1],
      "eval_shards": shard_names[-1:],
      "pad_latent": PAD_LATENT_NAME,
      "files": files,
      "content_sha256": content.hexdigest(),
  }
  # Written last and atomically: a crashed build leaves no manifest, so the next run rebuilds.
  storage.write_bytes(os.path.join(out_dir, MANIFEST_NAME),
                      (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8"))
  for item in dropped:
    print(f"dropped {item['key']}: {item['frames']} frames > {MAX_FRAMES}: {item['text']!r}", file=sys.stderr)
  return manifest


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="data/demo", help="output directory")
  parser.add_argument("--limit", type=int, default=None, help="use only the first N sentences (small builds)")
  parser.add_argument("--speakers", type=int, default=None,
                      help=f"use the first N of the {len(SPEAKERS)} speakers (default all)")
  parser.add_argument("--shard_size", type=int, default=500, help="samples per training shard")
  parser.add_argument("--seed", type=int, default=0, help="seed of the eval split, references and sample order")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  manifest = build(args.out, limit=args.limit, num_speakers=args.speakers, shard_size=args.shard_size,
                   seed=args.seed)
  size = sum(os.path.getsize(os.path.join(args.out, name)) for name in manifest["files"])
  print(f"{args.out}: {manifest['counts']}, {size / 1e6:.1f} MB, content {manifest['content_sha256'][:16]}, "
        f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
