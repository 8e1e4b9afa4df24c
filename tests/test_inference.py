"""inference.py end to end: a checkpoint from a short tiny training run -> a wav; bad input -> error, no file."""

import hashlib
import json
import logging
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
import types

import fake_gcs
import jax
import numpy as np
import pytest
import soundfile
from absl import flags
from conftest import REPO, cpu_env, load_config, write_synthetic_shards
from jax.experimental import multihost_utils
from PIL import Image

import inference
from echo_jax import codecs, synthesis
from echo_jax.checkpoint import export_pickle, load_params, save_params, write_config_json
from echo_jax.config import model_config
from echo_jax.model import Echo
from echo_jax.sampling import SamplerConfig
from echo_jax.train import entry, samples
from echo_jax.train.loop import StepInfo, Trainer
from echo_jax.train.samples import SampleExample, make_sample_hook
from echo_jax.train.state import create_train_state

HOP = 64


class FrameCodec:
  """A trivial codec for tests: 1600 Hz, 25 frames/s; a latent is the 8 block means of a 64-sample frame (×4)."""

  sample_rate = 1600
  frame_rate = 25.0

  def __init__(self, latent_dim=8, name="none"):
    self.latent_dim = latent_dim
    self.name = name  # the codec it stands for

  def encode(self, audio):
    audio = np.asarray(audio, np.float32)
    audio = np.pad(audio, (0, -audio.size % HOP))
    return 4 * audio.reshape(-1, self.latent_dim, HOP // self.latent_dim).mean(-1)

  def decode(self, latents):
    return np.repeat(np.asarray(latents, np.float32) / 4, HOP // self.latent_dim, axis=1).reshape(-1)

  @property
  def pad_latent(self):
    return np.zeros(self.latent_dim, np.float32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run directory trained for a few steps on synthetic shards written with `write_shard`."""
  tmp = tmp_path_factory.mktemp("inference")
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp / "shards")
  config.train.steps = 3
  config.train.ckpt_every = 3
  config.train.eval_every = 0
  workdir = str(tmp / "run")
  Trainer(config, workdir).run()
  return workdir


@pytest.fixture
def reference_wav(tmp_path):
  t = np.arange(2 * FrameCodec.sample_rate) / FrameCodec.sample_rate
  path = str(tmp_path / "ref.wav")
  soundfile.write(path, (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), FrameCodec.sample_rate)
  return path


@pytest.fixture
def cli(monkeypatch):
  """Runs inference.main with argv and the test codec; returns its exit code."""
  def call(*argv, codec=None):
    monkeypatch.setattr(codecs, "get_codec", lambda name, weights=None: codec or FrameCodec(name=name))
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["inference.py", *argv])
    try:
      inference.main(["inference.py"])
    except SystemExit as exit_:
      return exit_.code
    return 0
  yield call
  flags.FLAGS.unparse_flags()


def test_writes_wav_of_plausible_length(run_dir, reference_wav, tmp_path, cli, capsys, caplog):
  output = str(tmp_path / "out.wav")
  text = "Hello there. This sentence is long enough to need a second chunk."
  code = cli(f"--checkpoint={run_dir}", f"--text={text}", f"--speaker_ref={reference_wav}", f"--output={output}",
             "--steps=4", "--duration=1.0", "--preset=fast", "--force_speaker=1.5")
  assert code == 0
  audio, rate = soundfile.read(output)
  chunks = synthesis.split_and_normalize(text, 32)
  assert rate == FrameCodec.sample_rate and len(chunks) >= 2
  # Each chunk gives between 1 frame and its 25 generated frames of audio.
  assert HOP * len(chunks) <= audio.size <= 25 * HOP * len(chunks)
  assert np.abs(audio).max() > 0
  printed = capsys.readouterr().out
  assert "[S1] Hello there." in printed and "real-time factor" in printed
  # Orbax's checkpointer looked for a step's metadata file in the step's state directory, and warned of it.
  assert not [r.getMessage() for r in caplog.records if r.name == "absl" and r.levelno >= logging.WARNING]
  assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]


def test_a_text_files_byte_order_mark_is_not_spoken(run_dir, tmp_path, cli, capsys):
  """Windows editors start UTF-8 files with one; it was fed to the model as three bytes of text (found by review)."""
  text_file = tmp_path / "story.txt"
  text_file.write_bytes("Hello there.".encode("utf-8-sig"))
  assert cli(f"--checkpoint={run_dir}", f"--text_file={text_file}", f"--output={tmp_path / 'out.wav'}", "--steps=2",
             "--duration=0.4") == 0
  assert "chunk 0: '[S1] Hello there.'" in capsys.readouterr().out


class SeeingAheadCodec(FrameCodec):
  """FrameCodec whose decoder sees one frame ahead, as a decoder's convolutions do; records what it decodes."""

  def __init__(self):
    super().__init__()
    self.decoded = []

  def decode(self, latents):
    self.decoded.append(latents.shape[0])
    return super().decode((latents + np.roll(latents, -1, axis=0)) / 2)


def test_speech_is_cropped_at_its_end(run_dir, monkeypatch):
  """The audio of the whole window, cut at the end of speech (DESIGN §8): the latents cut there were decoded alone,
  so the last frame's sound lost what came after it, and each length compiled a decoder of its own."""
  codec = SeeingAheadCodec()
  synthesizer = synthesis.Synthesizer.from_checkpoint(run_dir, codec)
  latents = np.zeros((2, 20, 8), np.float32)
  latents[0, :12] = 1.0
  latents[1, :5] = -1.0
  monkeypatch.setattr(synthesis.Synthesizer, "generate_latents", lambda self, chunks, *args, **kw: latents)
  result = synthesizer.synthesize("One two three four five six, seven eight nine ten.", sampler=SamplerConfig(),
                                  duration=0.8)
  assert [piece.shape[0] for piece in result.latents] == [12, 5]
  assert codec.decoded == [20, 20]
  np.testing.assert_array_equal(result.audio, np.concatenate([codec.decode(latents[0])[: 12 * HOP],
                                                              codec.decode(latents[1])[: 5 * HOP]]))
  latents[1] = 0.0
  with pytest.raises(synthesis.SynthesisError, match="only silence for chunk 1"):
    synthesizer.synthesize("One two three four five six, seven eight nine ten.", duration=0.8)


def test_speech_that_runs_to_the_end_of_the_window_is_warned_of(run_dir, monkeypatch, caplog):
  """It was accepted without a word: speech cut off mid-word by too short a --duration (found by review)."""
  synthesizer = synthesis.Synthesizer.from_checkpoint(run_dir, FrameCodec())
  latents = np.zeros((2, 20, 8), np.float32)
  latents[0, :12] = 1.0
  latents[1, :] = -1.0  # never settles onto the pad latent
  monkeypatch.setattr(synthesis.Synthesizer, "generate_latents", lambda self, chunks, *args, **kw: latents)
  result = synthesizer.synthesize("One two three four five six, seven eight nine ten.", duration=0.8)
  assert [piece.shape[0] for piece in result.latents] == [12, 20]
  cut = [r.getMessage() for r in caplog.records if "did not end in silence" in r.getMessage()]
  assert len(cut) == 1 and cut[0].startswith("chunk 1 (") and "longer duration (inference.py --duration)" in cut[0]


def test_synthesize_generates_the_default_duration_by_default(run_dir, monkeypatch):
  """synthesize() generated 15 s by default, whatever window the model trained on (found by review)."""
  synthesizer = synthesis.Synthesizer.from_checkpoint(run_dir, FrameCodec())
  seen = []
  monkeypatch.setattr(synthesis.Synthesizer, "generate_latents",
                      lambda self, chunks, speaker, sampler, frames, *args, **kw: seen.append(frames)
                      or np.ones((len(chunks), frames, 8)))
  synthesizer.synthesize("Hello there.")
  assert seen == [synthesizer.config.data.max_frames]  # the tiny model's 32 frames (1.28 s), not 15 s


def test_a_duration_past_the_training_window_is_warned_of_once(run_dir, tmp_path, cli, caplog):
  """inference.py printed the warning twice: it checked the duration, and synthesize checked it again (found by
  review)."""
  assert cli(f"--checkpoint={run_dir}", "--text=Hello there.", f"--output={tmp_path / 'out.wav'}", "--steps=1",
             "--duration=1.6") == 0
  warnings = [r.getMessage() for r in caplog.records if "the model trained on" in r.getMessage()]
  assert warnings == ["40 frames (1.6 s) is longer than the 32 frames the model trained on; quality may suffer"]


def test_a_duration_of_more_than_four_training_windows_is_refused_before_the_load(run_dir, tmp_path, cli, capsys,
                                                                                  monkeypatch):
  """--duration 100000 warned, loaded everything, then died out of memory with a traceback (found by review)."""
  synthesizer = synthesis.Synthesizer.from_checkpoint(run_dir, FrameCodec())
  assert synthesizer.frames_for(4 * 32 / 25) == 128  # four of the tiny model's 32-frame windows are allowed
  with pytest.raises(synthesis.SynthesisError, match=r"duration 5.2 s \(130 latent frames\) is more than 4 times"):
    synthesizer.synthesize("Hello there.", duration=5.2)
  monkeypatch.setattr(synthesis.checkpoint, "load_params", lambda *args: pytest.fail("parameters read"))
  output = tmp_path / "out.wav"
  assert cli(f"--checkpoint={run_dir}", "--text=Hello.", f"--output={output}", "--duration=100000") == 1
  assert ("error: duration 100000 s (2500000 latent frames) is more than 4 times the 1.28 s (32 frames, "
          "config.data.max_frames) the model trained on: give at most 5.12 s (inference.py --duration)"
          ) in capsys.readouterr().err
  assert not output.exists()


def test_running_out_of_device_memory_is_an_error_with_advice(run_dir, tmp_path, cli, capsys, monkeypatch):
  """It ended in a JaxRuntimeError traceback (found by review); fewer chunks at once need less memory."""
  batches = []

  def sample(params, cfg, sampler, key, text, *args, **kwargs):
    batches.append(text.shape[0])
    if text.shape[0] > 1:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 300013787860232 bytes.\nmore")
    return np.ones((1, 20, 8), np.float32)

  monkeypatch.setattr(synthesis.sampling, "sample", sample)
  output = tmp_path / "out.wav"
  args = (f"--checkpoint={run_dir}", "--text=Hello there. This sentence is long enough to need a second chunk.",
          f"--output={output}", "--duration=0.8")
  assert cli(*args) == 1
  err = capsys.readouterr().err
  assert ("error: the generation ran out of memory on the device (RESOURCE_EXHAUSTED: Out of memory allocating "
          "300013787860232 bytes.); try a shorter --duration (now 0.8 s) or fewer chunks per batch (--batch_chunks, "
          "now 8)") in err
  assert "Traceback" not in err and not output.exists()
  batches.clear()
  assert cli(*args, "--batch_chunks=1") == 0 and len(batches) >= 2 and set(batches) == {1}


def test_chunks_are_generated_in_bounded_batches(run_dir, monkeypatch):
  """Every chunk of a text was one batch, whose memory grows with it (a chapter ran out of memory; found by review)."""
  synthesizer = synthesis.Synthesizer.from_checkpoint(run_dir, FrameCodec())
  batches = []

  def sample(params, cfg, sampler, key, text, *args, **kwargs):
    batches.append((text.shape[0], tuple(np.asarray(jax.random.key_data(key)).tolist())))
    return np.full((text.shape[0], 20, 8), len(batches), np.float32)

  monkeypatch.setattr(synthesis.sampling, "sample", sample)
  chunks = [f"[S1] chunk {i}." for i in range(5)]
  latents = synthesizer.generate_latents(chunks, None, SamplerConfig(steps=2), 20, seed=7, max_batch=2)
  # The last batch is filled up to the others' size: a batch of another size compiled the sampler again.
  assert [size for size, _ in batches] == [2, 2, 2]
  assert len({key for _, key in batches}) == 3  # a key of its own per batch
  assert latents.shape == (5, 20, 8) and latents[:, 0, 0].tolist() == [1, 1, 2, 2, 3]
  batches.clear()  # by default, at most 8 at once
  synthesizer.generate_latents([f"[S1] chunk {i}." for i in range(9)], None, SamplerConfig(steps=2), 20, seed=7)
  assert [size for size, _ in batches] == [8, 8]
  batches.clear()  # a single batch is as long as the text
  synthesizer.generate_latents(chunks[:3], None, SamplerConfig(steps=2), 20, seed=7)
  assert [size for size, _ in batches] == [3]


def test_a_chunk_in_a_filled_up_last_batch_is_what_it_is_alone(run_dir):
  """The last batch is filled up to the others' size with its last chunk again: the chunks in it must come out as
  generated in a batch of their own (a row's noise and computation do not depend on the batch size)."""
  synthesizer = synthesis.Synthesizer.from_checkpoint(run_dir, FrameCodec())
  chunks, sampler = [f"[S1] chunk {i}." for i in range(3)], SamplerConfig(steps=2)
  filled = synthesizer.generate_latents(chunks, None, sampler, 20, seed=7, max_batch=2)
  alone = synthesizer._generate_batch(chunks[2:], None, sampler, 20, jax.random.fold_in(jax.random.key(7), 1),
                                      progress=False)
  assert filled.shape == (3, 20, 8)
  np.testing.assert_allclose(filled[2], alone[0], atol=1e-4)


def test_a_reference_longer_than_the_training_references_is_cut_to_its_middle(run_dir, reference_wav, tmp_path, cli,
                                                                               monkeypatch, caplog):
  """Training crops references to config.data.max_ref_frames; inference used up to 5 minutes of one, unwarned (found
  by review). A file and given latents are cut alike, with one warning."""
  synthesizer = synthesis.Synthesizer.from_checkpoint(run_dir, FrameCodec())
  longest = synthesizer.config.data.max_ref_frames  # 16 frames (0.64 s) for the tiny model
  audio, _ = soundfile.read(reference_wav, dtype="float32")
  whole = FrameCodec().encode(audio)  # 50 frames (2 s)
  np.testing.assert_allclose(synthesizer.reference_latents(reference_wav), whole[17:17 + longest], atol=1e-4)
  seen = []
  monkeypatch.setattr(synthesis.Synthesizer, "generate_latents",
                      lambda self, chunks, speaker, *args, **kw: seen.append(speaker) or np.ones((1, 20, 8)))
  synthesizer.synthesize("Hello there.", speaker=np.arange(40 * 8, dtype=np.float32).reshape(40, 8), duration=0.8)
  np.testing.assert_array_equal(seen[0], np.arange(12 * 8, 28 * 8).reshape(16, 8))
  assert [r.getMessage() for r in caplog.records if "cut from" in r.getMessage()] == [
      f"the speaker reference {reference_wav}: cut from 2.0 s to the middle 0.6 s, the longest reference the model "
      "trained on (config.data.max_ref_frames=16 frames)",
      "the speaker latents: cut from 1.6 s to the middle 0.6 s, the longest reference the model trained on "
      "(config.data.max_ref_frames=16 frames)"]
  monkeypatch.undo()
  caplog.clear()
  assert cli(f"--checkpoint={run_dir}", "--text=Hello.", f"--speaker_ref={reference_wav}", "--steps=1",
             "--duration=0.4", f"--output={tmp_path / 'out.wav'}") == 0
  assert len([r for r in caplog.records if "cut from" in r.getMessage()]) == 1


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64, True, 1.5])
def test_a_seed_outside_32_bits_is_refused(seed, run_dir, monkeypatch):
  """JAX keeps a seed's low 32 bits: 2**32 gave seed 0's audio, -1 that of 2**32 - 1, and 2**64 an OverflowError
  traceback after the checkpoint's load (found by review). Refused on the command line and in the library."""
  synthesizer = synthesis.Synthesizer.from_checkpoint(run_dir, FrameCodec())
  monkeypatch.setattr(synthesis.sampling, "sample", lambda *args, **kwargs: pytest.fail("sampled"))
  with pytest.raises(synthesis.SynthesisError, match=rf"seed must be an integer from 0 to 4294967295 .*got {seed!r}"):
    synthesizer.synthesize("Hello there.", seed=seed, duration=0.8)
  with pytest.raises(synthesis.SynthesisError, match="seed must be an integer from 0 to 4294967295"):
    synthesizer.generate_latents(["[S1] Hello there."], None, SamplerConfig(steps=2), 20, seed=seed)
  if isinstance(seed, int) and not isinstance(seed, bool):
    try:
      with pytest.raises(flags.IllegalFlagValueError, match=r"is not an integer in the range \[0, 4294967295\]"):
        flags.FLAGS(["inference.py", f"--seed={seed}"])
    finally:
      flags.FLAGS.unparse_flags()


def test_given_speaker_latents_are_cut_to_whole_patches(run_dir, monkeypatch):
  synthesizer = synthesis.Synthesizer.from_checkpoint(run_dir, FrameCodec())
  patch, dim = synthesizer.cfg.speaker_patch, synthesizer.cfg.latent_dim
  seen = []
  monkeypatch.setattr(synthesis.Synthesizer, "generate_latents",
                      lambda self, chunks, speaker, *args, **kw: seen.append(speaker) or np.ones((1, 20, dim)))
  synthesizer.synthesize("Hello there.", speaker=np.ones((2 * patch + 1, dim)), duration=0.8)
  assert seen[0].shape == (2 * patch, dim)
  with pytest.raises(synthesis.SynthesisError, match=f"too short: the speaker latents: {patch - 1} latent frames"):
    synthesizer.synthesize("Hello there.", speaker=np.ones((patch - 1, dim)), duration=0.8)


def test_each_chunk_fits_the_models_text_length_in_bytes(run_dir, monkeypatch):
  """Chunks were sized in characters: Chinese text (3 bytes a character) was cut to the model's text length, with a
  warning only, and the run reported success (found by review)."""
  synthesizer = synthesis.Synthesizer.from_checkpoint(run_dir, FrameCodec())
  max_len, seen = synthesizer.config.data.max_text_len, []
  monkeypatch.setattr(synthesis.Synthesizer, "generate_latents",
                      lambda self, chunks, *args, **kw: seen.extend(chunks) or np.ones((len(chunks), 20, 8)))
  text = "今天天气很好，我们去公园散步吧。我们明天一起去北京。"
  synthesizer.synthesize(text, duration=0.8)
  assert len(seen) > 2 and all(len(chunk.encode()) + 1 <= max_len for chunk in seen), (max_len, seen)
  assert "".join(chunk.removeprefix("[S1] ") for chunk in seen).replace(" ", "") == text


@pytest.mark.parametrize("case", ["empty text", "unreadable reference", "silent reference", "latent_dim mismatch",
                                  "missing checkpoint", "damaged checkpoint", "damaged converted parameters",
                                  "cut-short pickle", "parameters of another config", "output is a directory",
                                  "nan scale", "infinite duration", "zero duration", "malformed config.json"])
def test_bad_input_gives_clear_error_and_no_file(case, run_dir, reference_wav, tmp_path, cli, capsys):
  output = str(tmp_path / "out.wav")
  args = {"checkpoint": run_dir, "text": "Hello there.", "speaker_ref": reference_wav}
  codec, expected, extra = None, None, []
  if case == "empty text":
    args["text"], expected = "   ", "text is empty"
  elif case == "unreadable reference":
    args["speaker_ref"] = str(tmp_path / "noise.wav")
    with open(args["speaker_ref"], "wb") as f:
      f.write(b"not audio at all" * 10)
    expected = "cannot read the speaker reference"
  elif case == "silent reference":
    args["speaker_ref"] = str(tmp_path / "silent.wav")
    soundfile.write(args["speaker_ref"], np.zeros(3200, np.float32), FrameCodec.sample_rate)
    expected = "is silent"
  elif case == "latent_dim mismatch":
    codec, expected = FrameCodec(latent_dim=16), "latent_dim=8 but the codec"
  elif case == "damaged checkpoint":  # its newest step's metadata cut short; an earlier step is intact
    args["checkpoint"] = str(tmp_path / "run")
    shutil.copytree(run_dir, args["checkpoint"])
    steps = pathlib.Path(args["checkpoint"]) / "checkpoints"
    shutil.copytree(steps / "3", steps / "1")
    metadata = steps / "3" / "state" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[: metadata.stat().st_size // 2])
    expected = f"reading the parameters of {steps / '3'} failed (JSONDecodeError"
    expected_advice = f"the files are damaged: use an earlier step, e.g. {steps / '1'}"
  elif case in ("damaged converted parameters", "parameters of another config"):
    # A converted directory's damage ended in a traceback and Orbax's bare error; another config's shapes in Orbax's
    # advice to pad or truncate the arrays (found by review).
    config, params = load_params(run_dir)
    args["checkpoint"] = str(tmp_path / "converted")
    save_params(params, config, args["checkpoint"])
    if case == "damaged converted parameters":
      for data in (tmp_path / "converted" / "params" / "ocdbt.process_0" / "d").iterdir():
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
      expected = f"reading the parameters of {tmp_path / 'converted' / 'params'} failed"
      expected_advice = "the files are damaged: copy or convert them again"
    else:
      config.model.mlp_dim *= 2
      write_config_json(config, args["checkpoint"])
      expected = f"the parameters in {tmp_path / 'converted' / 'params'} are not those of the model config: "
  elif case == "cut-short pickle":  # an UnpicklingError's traceback before
    config, params = load_params(run_dir)
    args["checkpoint"] = str(tmp_path / "model.pkl")
    write_config_json(config, str(tmp_path))
    whole = pickle.dumps({"params": jax.tree.map(np.asarray, params), "opt_state": {}, "step": 3})
    pathlib.Path(args["checkpoint"]).write_bytes(whole[: len(whole) // 2])
    expected = f"{args['checkpoint']} is not a readable pickle"
  elif case == "output is a directory":  # refused before the generation; it used to end in a traceback after it
    output = str(tmp_path / "outdir")
    os.mkdir(output)
    expected = f"cannot write --output {output}: [Errno 21] is a directory: give a file name in it"
  elif case == "nan scale":  # it wrote a wav of full-scale DC, exit 0
    extra, expected = ["--cfg_scale=nan"], "cfg_scale must be a finite number, got nan"
  elif case == "infinite duration":
    extra, expected = ["--duration=inf"], "duration must be a positive number of seconds, got inf"
  elif case == "zero duration":  # it was taken for no --duration: the default
    extra, expected = ["--duration=0"], "duration must be a positive number of seconds, got 0.0"
  elif case == "malformed config.json":  # the JSON decoder's message alone named no file (found by review)
    args["checkpoint"] = str(tmp_path / "run")
    shutil.copytree(run_dir, args["checkpoint"])
    (tmp_path / "run" / "config.json").write_text('{"model": {"dim": 64,')
    expected = f"the checkpoint's config {tmp_path / 'run' / 'config.json'} is not readable JSON (Expecting"
  else:
    args["checkpoint"], expected = str(tmp_path / "nowhere"), "checkpoint not found"
  code = cli(*(f"--{k}={v}" for k, v in args.items()), f"--output={output}", "--steps=2", "--duration=0.4", *extra,
             codec=codec)
  assert code == 1
  err = capsys.readouterr().err
  assert expected in err
  if case in ("damaged checkpoint", "damaged converted parameters"):
    assert expected_advice in err
  assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
  assert os.listdir(tmp_path) == [name for name in os.listdir(tmp_path) if not name.startswith("out.wav")]


def test_a_codec_other_than_the_checkpoints_is_refused(run_dir, tmp_path, cli, capsys, monkeypatch):
  """mel and dacvae both make 128-d latents at 25 frames/s: a DACVAE model's latents decoded with --codec mel passed
  every check, and the run wrote noise and succeeded (found by review). A config that names no codec takes one."""
  config, params = load_params(run_dir)
  config.codec = "dacvae"
  save_params(params, config, str(tmp_path / "dacvae_model"))
  output = tmp_path / "out.wav"
  assert cli(f"--checkpoint={tmp_path / 'dacvae_model'}", "--text=Hello.", "--codec=mel", f"--output={output}",
             "--steps=1", "--duration=0.4") == 1
  assert ("error: the checkpoint was trained on dacvae latents (its config.codec='dacvae'); the mel codec cannot "
          "speak them: leave out --codec, or give --codec dacvae") in capsys.readouterr().err
  assert not output.exists()
  # Refused before the parameters are read, as in the library.
  monkeypatch.setattr(synthesis.checkpoint, "load_params", lambda *args: pytest.fail("parameters read"))
  with pytest.raises(synthesis.SynthesisError, match="trained on dacvae latents"):
    synthesis.Synthesizer.from_checkpoint(str(tmp_path / "dacvae_model"), "mel")
  monkeypatch.undo()
  with pytest.raises(synthesis.SynthesisError, match="trained on dacvae latents"):  # a codec built elsewhere
    synthesis.Synthesizer(config, params, FrameCodec(name="mel"))
  assert cli(f"--checkpoint={tmp_path / 'dacvae_model'}", "--text=Hello.", "--codec=dacvae", "--codec_weights=w",
             f"--output={output}", "--steps=1", "--duration=0.4") == 0  # the test codec stands for dacvae
  assert cli(f"--checkpoint={run_dir}", "--text=Hello.", "--codec=mel", f"--output={output}", "--steps=1",
             "--duration=0.4") == 0  # the tiny config's codec is "none"


def test_a_failed_run_leaves_no_directories_of_its_output(tmp_path, cli, capsys):
  """The check that --output can be written made its directories, before the checkpoint was looked for: a failed run
  left them, though nothing is written on an error (found by review)."""
  output = tmp_path / "new" / "deeper" / "out.wav"
  assert cli(f"--checkpoint={tmp_path / 'nowhere'}", "--text=Hello.", f"--output={output}") == 1
  assert "checkpoint not found" in capsys.readouterr().err
  assert not (tmp_path / "new").exists()


def test_a_checkpoint_of_fish_latents_is_refused_with_the_reason():
  """Upstream's echo_base_fish (config.codec = "fish_pca") trains and exports here; no codec here can speak it."""
  with pytest.raises(ValueError, match=r"the fish_pca codec .* is not implemented here: .* not spoken"):
    codecs.get_codec("fish_pca")
  # A test config's "none" was reported as an unknown codec, with no hint of --codec (found by review).
  with pytest.raises(ValueError, match=r"names no codec \(codec='none'.*--codec mel or --codec dacvae"):
    codecs.get_codec("none")


def hook_trainer(config, workdir) -> tuple[types.SimpleNamespace, list]:
  """What a sample hook reads of its Trainer (process 0's), and the events it logs there."""
  events = []
  trainer = types.SimpleNamespace(config=config, workdir=str(workdir), is_main=True,
                                  log=types.SimpleNamespace(event=lambda name, **kw: events.append((name, kw))))
  return trainer, events


def test_training_sample_hook_writes_samples_and_survives_failure(run_dir, tmp_path):
  config, params = load_params(run_dir)
  trainer, events = hook_trainer(config, tmp_path)
  examples = [SampleExample("Hello there.", None),
              SampleExample("A second one.", np.ones((9, 8), np.float32))]  # any length, as in shards
  hook = make_sample_hook(FrameCodec(), examples, SamplerConfig(steps=3), duration=0.8)
  hook(StepInfo(step=7, state=types.SimpleNamespace(params=params), trainer=trainer))
  directory = tmp_path / "samples" / "step_7"
  assert sorted(os.listdir(directory)) == ["0.png", "0.txt", "0.wav", "1.png", "1.txt", "1.wav"]
  assert (directory / "0.txt").read_text() == "[S1] Hello there.\n"
  assert 0 < soundfile.info(str(directory / "1.wav")).frames <= 20 * HOP
  assert Image.open(directory / "0.png").size[1] == 256
  assert events[-1][0] == "samples_written"
  # A failure (here a codec that does not fit the model) is logged, not raised.
  make_sample_hook(FrameCodec(latent_dim=16), examples)(
      StepInfo(step=8, state=types.SimpleNamespace(params=params), trainer=trainer))
  assert events[-1][0] == "sample_error" and "latent_dim" in events[-1][1]["message"]
  assert not (tmp_path / "samples" / "step_8").exists()


def test_a_sample_hook_whose_gather_fails_stops_the_run(run_dir, tmp_path, monkeypatch):
  """The gather of the parameters is a collective: a process that failed it and trained on met the others in
  different collectives (seen with 2 FSDP processes: one aborted on a collective mismatch, the other trained on into
  its hang watchdog, and the cause reached no log). It is raised, not logged as a sample error."""
  config, params = load_params(run_dir)
  trainer, events = hook_trainer(config, tmp_path)

  def gather_fails(tree, tiled=False):
    raise MemoryError("the gathered parameters do not fit")

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", gather_fails)
  hook = make_sample_hook(FrameCodec(), [SampleExample("Hello there.", None)], SamplerConfig(steps=3), duration=0.8)
  with pytest.raises(MemoryError, match="do not fit"):
    hook(StepInfo(step=7, state=types.SimpleNamespace(params=params), trainer=trainer))
  assert events == [] and not (tmp_path / "samples").exists()


def test_the_sample_hook_gathers_the_parameters_one_array_at_a_time(run_dir, tmp_path, monkeypatch):
  """process_allgather of the whole tree held every gathered array on every process until the last one came, and
  left the bound on the device's extra memory to how JAX maps a tree. Each call now gathers one array, every process
  makes the same calls in the same order, and process 0 speaks with what a gather of the whole tree gives."""
  config, params = load_params(run_dir)
  gathered, synthesized = [], []

  def gather(tree, tiled=False):  # what the gather gives in one process
    gathered.append([leaf.shape for leaf in jax.tree.leaves(tree)])
    return jax.device_get(tree)

  def recording_synthesizer(config, params, codec):
    synthesized.append(params)
    return synthesis.Synthesizer(config, params, codec)

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", gather)
  monkeypatch.setattr(samples, "Synthesizer", recording_synthesizer)
  for is_main in (False, True):
    trainer, events = hook_trainer(config, tmp_path)
    trainer.is_main = is_main
    gathered.clear()
    hook = make_sample_hook(FrameCodec(), [SampleExample("Hello there.", None)], SamplerConfig(steps=3), duration=0.8)
    hook(StepInfo(step=7, state=types.SimpleNamespace(params=params), trainer=trainer))
    assert gathered == [[leaf.shape] for leaf in jax.tree.leaves(params)], is_main
  assert [name for name, _ in events] == ["samples_written"] and len(synthesized) == 1
  whole = jax.device_get(params)
  assert jax.tree.structure(synthesized[0]) == jax.tree.structure(whole)
  for used, expected in zip(jax.tree.leaves(synthesized[0]), jax.tree.leaves(whole), strict=True):
    np.testing.assert_array_equal(used, expected)


def test_samples_from_a_codec_of_another_latent_size_are_refused_at_the_launch(tiny_config):
  """Every sample step failed on it, reported in events.jsonl only, the console silent (found by review)."""
  tiny_config.codec = "mel"  # 128-d latents; the tiny model's are 8-d
  tiny_config.samples.every = 1
  with pytest.raises(ValueError, match=r"config\.codec='mel' makes 128-d latents but the model's are 8-d"):
    entry.sample_hooks(tiny_config)


def test_held_out_examples_that_cannot_be_read_are_a_sample_error_and_training_goes_on(tiny_config, tmp_path,
                                                                                        monkeypatch):
  """The held-out examples were read as the hook was made, before the Trainer existed: a listing that failed ended
  the launch. Now they are read in the background; a failed read is a sample_error at the sample step, training goes
  on, and the next sample step reads them again (here the held-out shard exists by then)."""
  config = tiny_config
  held_out = tmp_path / "held_out"
  config.data.eval_shards = str(held_out / "eval-*.tar")  # nothing there yet
  config.codec = "mel"  # stands for any codec: get_codec gives the test's
  config.samples.update(every=2, count=2, steps=2)
  config.train.update(steps=4, eval_every=0, ckpt_every=4)
  monkeypatch.setattr(codecs, "get_codec", lambda name, weights=None: FrameCodec(name=name))

  def write_held_out(info):
    if info.step == 2:
      write_synthetic_shards(held_out, num_shards=1, seed=1, prefix="eval")

  Trainer(config, str(tmp_path / "run"), hooks=(*entry.sample_hooks(config), (2, write_held_out))).run()
  log = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
  reports = [(e["event"], e["step"], e.get("message", "")) for e in log if e["event"].startswith("sample")]
  assert [report[:2] for report in reports] == [("sample_error", 2), ("samples_written", 4)], reports
  assert "reading the held-out examples failed" in reports[0][2] and "matches no file" in reports[0][2], reports[0]
  assert sorted(os.listdir(tmp_path / "run" / "samples")) == ["step_4"]
  assert [e["step"] for e in log if e["event"] == "checkpoint_saved"] == [4]


def test_held_out_examples_are_read_once_waited_for_a_bounded_time_and_read_again_after_a_failure():
  """A sample step must not wait without end on a read that stalls (the other processes wait for process 0 in the
  next step's collective, under the hang watchdog), and one failed read must not end the samples of the launch."""
  release, reads = threading.Event(), []
  example = SampleExample("Hello there.", None)

  def read():
    reads.append(len(reads))
    if len(reads) == 1:
      raise OSError("429 Too Many Requests")
    release.wait()
    return [example]

  examples = samples.HeldOutExamples(read)
  examples.start()
  with pytest.raises(RuntimeError, match="reading the held-out examples failed: OSError: 429 Too Many Requests"):
    examples.result(5)
  with pytest.raises(TimeoutError, match="still being read after 0.1 s"):
    examples.result(0.1)  # the read that this call started again
  release.set()
  assert examples.result(5) == [example] and examples.result(0) == [example] and reads == [0, 1]


def params_digest(params) -> dict[str, str]:
  return {jax.tree_util.keystr(path): hashlib.sha256(np.asarray(leaf).tobytes()).hexdigest()
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


READ_FROM_GCS = textwrap.dedent("""\
    import json, sys
    from test_inference import params_digest
    from echo_jax.checkpoint import load_params
    for url in sys.argv[1:]:
      try:
        config, params = load_params(url)
        print(json.dumps([url, config.model.dim, params_digest(params)]))
      except FileNotFoundError as error:
        print(json.dumps([url, "FileNotFoundError", str(error)]))
""")


def test_weights_on_gs_are_read_where_they_are(run_dir, tmp_path):
  """A pod's run directory is on gs://: inference and --init_from (both `load_params`) read its weights there, in
  every form (the run, one of its steps, a parameters directory, a pickle), and get what a local copy gives. GCS is
  stood in for by a local directory (tests/fake_gcs.py): tensorstore reads the arrays from it over HTTP."""
  root = tmp_path / "gcs"
  shutil.copytree(run_dir, root / "bucket" / "run")
  config, params = load_params(run_dir)
  save_params(params, config, str(root / "bucket" / "converted"))
  state = create_train_state(Echo(model_config(config)), jax.random.key(7), config)
  (root / "bucket" / "pickled").mkdir()
  export_pickle(state, samples_seen=0, path=str(root / "bucket" / "pickled" / "state.pkl"))
  write_config_json(config, str(root / "bucket" / "pickled"))
  forms = ["run", "run/checkpoints/3", "converted", "pickled/state.pkl"]
  with fake_gcs.serve(str(root)) as gcs:
    result = subprocess.run(
        [sys.executable, "-c", READ_FROM_GCS, *(f"gs://bucket/{form}" for form in forms),
         "gs://bucket/nowhere"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=fake_gcs.subprocess_env(gcs.url))
  assert result.returncode == 0, result.stderr[-3000:]
  read = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
  for form, (url, dim, digest) in zip(forms, read[:len(forms)], strict=True):
    local_config, local_params = load_params(str(root / "bucket" / form))
    assert url == f"gs://bucket/{form}" and dim == local_config.model.dim
    assert digest == params_digest(local_params), form
  assert read[len(forms):] == [["gs://bucket/nowhere", "FileNotFoundError", "checkpoint not found: gs://bucket/nowhere"]]
  # The arrays came over HTTP, as from GCS: Orbax's array files of each Orbax form.
  assert {path.split("/")[1] for path in gcs.served if "ocdbt" in path or "/d/" in path} \
      == {"run", "converted"}


def test_non_finite_audio_is_refused_and_nothing_is_written(tmp_path):
  """Clipped and cast to 16 bits, NaN would be written as full-scale noise, a file that looks like speech output."""
  from echo_jax.codecs import audio  # noqa: PLC0415

  with pytest.raises(ValueError, match="holds non-finite values"):
    audio.write_wav(str(tmp_path / "out.wav"), np.array([0.1, np.nan, 0.2], np.float32), 16000)
  assert not list(tmp_path.iterdir())


def test_a_damaged_checkpoints_error_is_the_last_line_the_cli_prints(run_dir, tmp_path):
  """The error was printed, then buried: the failed restore's pending reads printed tracebacks ending in
  `RuntimeError: Event loop is closed` after it as the interpreter shut down (found by review: line 18 of 2,465)."""
  damaged = tmp_path / "run"
  shutil.copytree(run_dir, damaged)
  for data in (damaged / "checkpoints" / "3" / "state" / "ocdbt.process_0" / "d").iterdir():  # the arrays' bytes
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  result = subprocess.run([sys.executable, "inference.py", f"--checkpoint={damaged}", "--text=Hello.", "--codec=mel",
                           f"--output={tmp_path / 'out.wav'}"], cwd=REPO, env=cpu_env(1), capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: reading the parameters of {damaged / 'checkpoints' / '3'} failed"), result.stderr[-3000:]
  assert not (tmp_path / "out.wav").exists()
