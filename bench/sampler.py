"""Sampler overhead and speed on CPU: cost of one sampling step ÷ one decoder forward at the same batch, and the
real-time factor of the whole generation (encoders + all steps), for configs/demo.py with random weights.

    JAX_PLATFORMS=cpu python bench/sampler.py [--steps 16] [--batch 1] [--repeats 5]

A step of a guided mode runs one decode at batch passes·B, so its cost should be that forward plus a little
(target ratio ≤ 1.1). The per-step cost is (time(2N steps) − time(N steps)) / N, which removes the encoders, the
noise and the dispatch that happen once per generation. Prints a table; appends JSON to bench/results/sampler.jsonl.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from echo_jax import sampling
from echo_jax.config import model_config
from echo_jax.model import Echo
from echo_jax.train.state import create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_RATIO = 1.1
FRAME_RATE = 25.0


def demo_config():
  spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def best_time(fn, repeats: int) -> float:
  """Minimum wall time of `fn()` over `repeats` runs after one warm-up (compilation) run."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  config = demo_config()
  cfg = model_config(config)
  params = create_train_state(Echo(cfg), jax.random.key(0), config).params
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
  batch, frames = args.batch, config.data.max_frames
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.integers(1, 256, (batch, config.data.max_text_len)), jnp.int32)
  text_mask = jnp.asarray(np.arange(config.data.max_text_len)[None] < 60).repeat(batch, 0)
  speaker = jnp.asarray(rng.standard_normal((batch, config.data.max_ref_frames, cfg.latent_dim)), jnp.float32)
  speaker_mask = jnp.ones((batch, config.data.max_ref_frames), bool)
  model = Echo(cfg)
  variables = {"params": params}
  decode = jax.jit(functools.partial(model.apply, method=Echo.decode))

  rows = []
  for mode in sampling.CFG_MODES:
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
    audio_seconds = batch * frames / FRAME_RATE
    rows.append({"mode": mode, "passes": passes, "decode_batch": passes * batch, "forward_ms": forward * 1e3,
                 "step_ms": per_step * 1e3, "ratio": per_step / forward, "generation_s": total,
                 "audio_s": audio_seconds, "rtf": total / audio_seconds})

  print(f"configs/demo.py, B={batch}, {frames} frames ({frames / FRAME_RATE:.1f} s), {args.steps} steps, "
        f"{jax.devices()[0].platform}")
  print(f"{'mode':<12}{'decode B':>9}{'forward ms':>12}{'step ms':>10}{'step/fwd':>10}{'gen s':>8}{'RTF':>8}")
  for r in rows:
    print(f"{r['mode']:<12}{r['decode_batch']:>9}{r['forward_ms']:>12.2f}{r['step_ms']:>10.2f}{r['ratio']:>10.3f}"
          f"{r['generation_s']:>8.3f}{r['rtf']:>8.3f}")
  record = {
      "benchmark": "sampler", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": "demo", "batch": batch,
      "frames": frames, "steps": args.steps, "target_ratio": TARGET_RATIO, "rows": rows,
      "machine": {"platform": jax.devices()[0].platform, "cores": os.cpu_count(), "python": platform.python_version(),
                  "load_average_1m": os.getloadavg()[0]},
  }
  os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
  with open(os.path.join(REPO, "bench", "results", "sampler.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  main()
