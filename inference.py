"""Speech from an Echo checkpoint (DESIGN §8).

    python inference.py --checkpoint runs/demo --text "Hello there." --speaker_ref ref.wav --output out.wav \
        [--preset balanced] [--cfg_scale 3.0 | --cfg_text 3 --cfg_speaker 8] [--cfg_mode independent|joint|alternating]
        [--steps 32] [--duration 15] [--seed 42] [--force_speaker 1.5] [--codec mel|dacvae --codec_weights F]
        [--batch_chunks 8]

Settings apply in this order: SamplerConfig defaults, then --preset, then every flag given on the command line.
--cfg_scale alone selects joint guidance. On any error nothing is written to --output; what depends on the
checkpoint's config alone (--codec, --duration) is checked before its parameters are loaded.
"""

from __future__ import annotations

import os
import sys
import time

import jax
from absl import app, flags, logging

from echo_jax import checkpoint, sampling, storage, synthesis
from echo_jax.codecs import audio as audio_lib

FLAGS = flags.FLAGS
ERROR_SETTLE_S = 0.5
flags.DEFINE_string("checkpoint", None, "run directory, checkpoints/<step> directory, params directory or .pkl")
flags.DEFINE_string("text", None, "text to speak")
flags.DEFINE_string("text_file", None, "UTF-8 file holding the text to speak (instead of --text)")
flags.DEFINE_string("speaker_ref", None, "reference recording of the voice (wav, flac, ogg, mp3, ...)")
flags.DEFINE_string("output", "out.wav", "wav file to write")
flags.DEFINE_string("preset", None, "sampler preset name from presets/sampler_presets.json")
flags.DEFINE_float("cfg_scale", None, "joint guidance scale (selects --cfg_mode=joint unless given)")
flags.DEFINE_float("cfg_text", None, "text guidance scale (independent / alternating)")
flags.DEFINE_float("cfg_speaker", None, "speaker guidance scale (independent / alternating)")
flags.DEFINE_enum("cfg_mode", None, list(sampling.CFG_MODES), "guidance mode")
flags.DEFINE_float("cfg_min_t", None, "guidance only for t >= this")
flags.DEFINE_float("cfg_max_t", None, "guidance only for t <= this")
flags.DEFINE_integer("steps", None, "Euler steps")
flags.DEFINE_float("truncation", None, "initial noise scale")
flags.DEFINE_float("force_speaker", None, "speaker K/V scale ('force speaker', e.g. 1.5)")
flags.DEFINE_integer("force_speaker_layers", None, "force the speaker in the first N decoder layers (default all)")
flags.DEFINE_float("force_speaker_min_t", None, "stop forcing the speaker once t < this")
flags.DEFINE_float("duration", None, "seconds of latent frames generated per chunk (speech is cropped at its end); "
                   "default 15 s, or less when the model trained on shorter windows; at most "
                   f"{synthesis.MAX_TRAINING_WINDOWS} training windows (config.data.max_frames)")
flags.DEFINE_integer("batch_chunks", synthesis.MAX_BATCH_CHUNKS,
                     "chunks generated at once: fewer need less device memory", lower_bound=1)
flags.DEFINE_integer("seed", 42, "noise seed", lower_bound=0, upper_bound=synthesis.SEED_LIMIT - 1)
flags.DEFINE_string("codec", None, "mel or dacvae, for a checkpoint whose config names no codec (default: the codec "
                    "named in the checkpoint's config; another one is refused)")
flags.DEFINE_string("codec_weights", None, "converted codec weights (dacvae)")

# Flag name -> SamplerConfig field, for flags that override the preset only when given.
SAMPLER_FLAGS = {
    "steps": "steps", "cfg_mode": "cfg_mode", "cfg_scale": "cfg_scale", "cfg_text": "cfg_text",
    "cfg_speaker": "cfg_speaker", "cfg_min_t": "cfg_min_t", "cfg_max_t": "cfg_max_t", "truncation": "truncation",
    "force_speaker": "speaker_kv_scale", "force_speaker_layers": "speaker_kv_max_layers",
    "force_speaker_min_t": "speaker_kv_min_t",
}


def sampler_from_flags() -> sampling.SamplerConfig:
  settings = {}
  if FLAGS.preset:
    settings = {k: v for k, v in vars(synthesis.load_preset(FLAGS.preset)).items()}
  for flag, field in SAMPLER_FLAGS.items():
    if FLAGS[flag].present:
      settings[field] = FLAGS[flag].value
  if FLAGS["cfg_scale"].present and not FLAGS["cfg_mode"].present:
    settings["cfg_mode"] = "joint"
  return sampling.SamplerConfig(**settings)


PATH_FLAGS = ("checkpoint", "text_file", "speaker_ref", "output", "codec_weights")


def read_text() -> str:
  if (FLAGS.text is None) == (FLAGS.text_file is None):
    raise synthesis.SynthesisError("give exactly one of --text and --text_file")
  if FLAGS.text is not None:
    return FLAGS.text
  try:
    with open(FLAGS.text_file, encoding="utf-8-sig") as f:  # a byte-order mark (Windows editors) is not text
      return f.read()
  except (OSError, UnicodeDecodeError) as error:
    raise synthesis.SynthesisError(f"cannot read --text_file {FLAGS.text_file}: {error}") from error


def run() -> synthesis.SynthesisResult:
  """Everything `main` does; raises SynthesisError (or ValueError) on bad input before writing anything."""
  if not FLAGS.checkpoint:
    raise synthesis.SynthesisError("--checkpoint is required")
  for name in PATH_FLAGS:  # a shell leaves `--output=~/out.wav` as it is
    if FLAGS[name].value:
      FLAGS[name].value = storage.expand_home(FLAGS[name].value)
  text = read_text()
  synthesis.split_and_normalize(text)  # an empty text fails before the checkpoint and codec are loaded
  sampler = sampler_from_flags()
  try:
    storage.check_writable(FLAGS.output)  # before the generation, not after it
  except OSError as error:
    raise synthesis.SynthesisError(f"cannot write --output {FLAGS.output}: {error}") from error
  # The config and the codec first: what depends on them alone is refused before the parameters' load (minutes for a
  # large model on gs://). The codec is built for its frame rate, which the length of the window depends on.
  config = checkpoint.load_config(FLAGS.checkpoint)
  codec = synthesis.codec_for(config, FLAGS.codec, FLAGS.codec_weights)
  duration = synthesis.default_duration(config, codec) if FLAGS.duration is None else FLAGS.duration  # 0 is refused
  frames = synthesis.window_frames(config, codec, duration)  # synthesize warns of one past the training window
  synthesizer = synthesis.Synthesizer(config, checkpoint.load_params(FLAGS.checkpoint, config)[1], codec)
  speaker = synthesizer.reference_latents(FLAGS.speaker_ref) if FLAGS.speaker_ref else None
  print(f"sampler: {sampler}")
  print(f"latent frames per chunk: {frames} ({duration:.1f} s at {codec.frame_rate:g} frames/s)")
  try:
    result = synthesizer.synthesize(text, speaker, sampler, duration, FLAGS.seed, progress=True,
                                    max_batch=FLAGS.batch_chunks)
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    raise synthesis.SynthesisError(
        f"the generation ran out of memory on the device ({str(error).splitlines()[0]}); try a shorter --duration "
        f"(now {duration:g} s) or fewer chunks per batch (--batch_chunks, now {FLAGS.batch_chunks})") from error
  for index, chunk in enumerate(result.chunks):
    print(f"chunk {index}: {chunk!r} -> {result.latents[index].shape[0] / codec.frame_rate:.2f} s")
  audio_lib.write_wav(FLAGS.output, result.audio, result.sample_rate)
  print(f"wrote {FLAGS.output}: {result.seconds:.2f} s of audio in {result.generation_seconds:.2f} s "
        f"(real-time factor {result.real_time_factor:.3f})")
  return result


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax narrates every read at INFO: the result and errors are what counts
  try:
    run()
  except (synthesis.SynthesisError, ValueError, OSError) as error:
    # A failed restore's other reads (tensorstore's) fail as its event loop closes, and print tracebacks from their
    # threads ("Event loop is closed"): a moment lets them finish first, so that the error is printed after them.
    time.sleep(ERROR_SETTLE_S)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  try:
    app.run(main)
  except SystemExit as exit_:
    if exit_.code in (0, None):
      raise
    # The error is printed. The reads of a failed restore that were still pending would print pages of "Event loop is
    # closed" tracebacks at the interpreter's exit, burying it; they have nothing left to do, so nothing more is shown.
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os._exit(exit_.code if isinstance(exit_.code, int) else 1)
