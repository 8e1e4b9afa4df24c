"""Sampler overhead and speed: cost of one sampling step ÷ one decoder forward at the same batch, and the real-time
factor of the whole generation (encoders + all steps), for a config with random weights.

    JAX_PLATFORMS=cpu python bench/sampler.py [--config demo] [--steps 16] [--batch 1] [--repeats 5]
    python bench/sampler.py --config echo_1p3b --frames 750 --steps 32 --modes independent   # 30 s, on a GPU
    python bench/sampler.py --config echo_base_fish --frames 640 --frame_rate 21.53 --steps 32 --modes independent

A step of a guided mode runs one decode at batch passes·B, so its cost should be that forward plus a little
(target ratio ≤ 1.1). The per-step cost is (time(2N steps) − time(N steps)) / N, which removes the encoders, the
noise and the dispatch that happen once per generation. GPU target: 30 s of audio, 32 steps, independent CFG, in
under 1 s on an H100. Prints a table; appends JSON to bench/results/sampler.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402 - needs the repository root on the path first
from echo_jax import sampling  # noqa: E402
from echo_jax.config import model_config  # noqa: E402
from echo_jax.model import Echo  # noqa: E402
from echo_jax.train.state import count_params, create_train_state  # noqa: E402

TARGET_RATIO = 1.1


def best_time(fn, repeats: int) -> float:
  """Minimum wall time of `fn()` (its result awaited) over `repeats` runs after one warm-up (compilation) run."""
  return min(common.time_calls(lambda: jax.block_until_ready(fn()), repeats)[0])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="demo", help="a name in configs/ or bench/configs/, or a .py path")
  parser.add_argument("--frames", type=int, default=0, help="latent frames to generate (0: the config's max_frames)")
  parser.add_argument("--frame_rate", type=float, default=25.0,
                      help="latent frames per second of the config's codec (25 for dacvae and mel; Fish-S1-DAC "
                           "21.53), for the audio duration")
  parser.add_argument("--modes", default=",".join(sampling.CFG_MODES), help="comma-separated CFG modes")
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no_save", action="store_true", help="print only; do not append to bench/results/")
  args = parser.parse_args()
  modes = [mode.strip() for mode in args.modes.split(",")]
  unknown = sorted(set(modes) - set(sampling.CFG_MODES))
  if unknown:
    parser.error(f"unknown CFG modes {unknown}; known: {', '.join(sampling.CFG_MODES)}")

  config = common.load_config(args.config)
  cfg = model_config(config)
  params = create_train_state(Echo(cfg), jax.random.key(0), config).params
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
  batch, frames = args.batch, args.frames or config.data.max_frames
  text_len, ref_frames = config.data.max_text_len, config.data.max_ref_frames
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.integers(1, 256, (batch, text_len)), jnp.int32)
  text_mask = jnp.asarray(np.arange(text_len)[None] < text_len // 2).repeat(batch, 0)
  speaker = jnp.asarray(rng.standard_normal((batch, ref_frames, cfg.latent_dim)), jnp.float32)
  speaker_mask = jnp.ones((batch, ref_frames), bool)
  model = Echo(cfg)
  variables = {"params": params}
  decode = jax.jit(functools.partial(model.apply, method=Echo.decode))

  rows = []
  for mode in modes:
    # cfg_min_t=0 guides every step, so each step is exactly one decode at passes·B.
    sampler = sampling.SamplerConfig(steps=args.steps, cfg_mode=mode, cfg_min_t=0.0, rescale_k=1.2,
                                     rescale_sigma=3.0)
    passes = sampler.passes
    context = model.apply(variables, *(jnp.concatenate([a] * passes) for a in (text, text_mask, speaker,
                                                                             speaker_mask)),
                          method=Echo.encode_context)
    x = jnp.asarray(rng.standard_normal((passes * batch, frames, cfg.latent_dim)), jnp.float32)
    forward = best_time(functools.partial(decode, variables, x, jnp.full((passes * batch,), 0.5), context),
                        args.repeats)

    def run(steps, mode=mode):
      s = sampling.SamplerConfig(steps=steps, cfg_mode=mode, cfg_min_t=0.0, rescale_k=1.2, rescale_sigma=3.0)
      return lambda: sampling.sample(params, cfg, s, jax.random.key(0), text, text_mask, speaker, speaker_mask,
                                     frames)

    total = best_time(run(args.steps), args.repeats)
    total_double = best_time(run(2 * args.steps), args.repeats)
    per_step = (total_double - total) / args.steps
    audio_seconds = batch * frames / args.frame_rate
    rows.append({"mode": mode, "passes": passes, "decode_batch": passes * batch, "forward_ms": forward * 1e3,
                 "step_ms": per_step * 1e3, "ratio": per_step / forward, "generation_s": total,
                 "audio_s": audio_seconds, "rtf": total / audio_seconds})

  device = jax.devices()[0]
  print(f"{args.config} ({count_params(params) / 1e6:.1f}M parameters, {cfg.dtype}), B={batch}, {frames} frames "
        f"({frames / args.frame_rate:.1f} s), {args.steps} steps, {device.device_kind}")
  print(common.format_table(rows, [
      ("mode", "mode", ""), ("decode_batch", "decode B", "d"), ("forward_ms", "forward ms", ".2f"),
      ("step_ms", "step ms", ".2f"), ("ratio", "step/fwd", ".3f"), ("generation_s", "gen s", ".3f"),
      ("audio_s", "audio s", ".1f"), ("rtf", "RTF", ".4f")]))
  if not args.no_save:
    path = common.append_result("sampler", {
        "config": args.config, "params_m": round(count_params(params) / 1e6, 1), "dtype": cfg.dtype, "batch": batch,
        "frames": frames, "frame_rate": args.frame_rate, "text_len": text_len, "ref_frames": ref_frames,
        "steps": args.steps, "target_ratio": TARGET_RATIO, "rows": rows, "device_kind": device.device_kind,
        "peak_memory_gib": common.peak_memory_gib(),
        "machine": common.machine()})
    print(f"appended to {path}")


if __name__ == "__main__":
  main()
