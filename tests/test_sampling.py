"""The sampler against a slow per-pass reference, the one-encode-per-generation property, end of speech, presets."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config

from echo_jax import sampling
from echo_jax.config import model_config
from echo_jax.model import Echo
from echo_jax.sampling import SamplerConfig
from echo_jax.train.state import init_params

BATCH, FRAMES, TEXT_LEN, REF_FRAMES = 2, 8, 12, 16


def tiny_setup(blockwise=False, seed=0):
  config = load_config("tiny")
  config.model.blockwise = blockwise
  cfg = model_config(config)
  params = jax.jit(lambda key: nn.unbox(init_params(Echo(cfg), key, config)))(jax.random.key(seed))
  # A fresh model's out_proj is zero-initialised and its AdaLN up-projections are zero: every velocity would be
  # zero and every comparison vacuous. Random weights everywhere make each pass differ.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(tree, [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in
                                    zip(leaves, keys, strict=True)])
  rng = np.random.default_rng(seed)
  inputs = {
      "text": jnp.asarray(rng.integers(1, 256, (BATCH, TEXT_LEN)), jnp.int32),
      "text_mask": jnp.asarray(np.arange(TEXT_LEN)[None] < np.array([[7], [11]])),
      "speaker": jnp.asarray(rng.standard_normal((BATCH, REF_FRAMES, cfg.latent_dim)), jnp.float32),
      "speaker_mask": jnp.asarray(np.arange(REF_FRAMES)[None] < np.array([[8], [16]])),
  }
  return cfg, params, inputs


def reference_sample(cfg, params, sampler, key, inputs, frames, prefix=None, start_pos=0):
  """The sampler written plainly: one `model.apply` per pass, encoders run on truly dropped inputs every time.

  Each apply is jitted on its own only because op-by-op execution of the scanned layers is slow on a CPU.
  """
  model = Echo(cfg)
  variables = {"params": params}
  encode = jax.jit(functools.partial(model.apply, method=Echo.encode_context))
  decode = jax.jit(functools.partial(model.apply, method=Echo.decode))
  text, text_mask, speaker, speaker_mask = (inputs[k] for k in ("text", "text_mask", "speaker", "speaker_mask"))
  x = np.asarray(jax.random.normal(key, (BATCH, frames, cfg.latent_dim))) * sampler.truncation
  schedule = np.linspace(1.0, 0.0, sampler.steps + 1, dtype=np.float32) * np.float32(0.999)
  for i in range(sampler.steps):
    t, t_next = schedule[i], schedule[i + 1]
    kv_scale = np.ones(cfg.layers, np.float32)
    if sampler.speaker_kv_scale is not None and t >= sampler.speaker_kv_min_t:
      kv_scale[:sampler.speaker_kv_max_layers] = sampler.speaker_kv_scale

    def run(tm, spk, sm, x=x, t=t, kv_scale=kv_scale):
      context = encode(variables, text, tm, spk, sm, prefix)
      return np.asarray(decode(variables, jnp.asarray(x, jnp.float32), jnp.full((BATCH,), t), context, start_pos,
                               jnp.asarray(kv_scale)))

    v_cond = run(text_mask, speaker, speaker_mask)
    no_text = lambda: run(jnp.zeros_like(text_mask), speaker, speaker_mask)
    no_speaker = lambda: run(text_mask, jnp.zeros_like(speaker), jnp.zeros_like(speaker_mask))
    v = v_cond
    if sampler.cfg_min_t <= t <= sampler.cfg_max_t:
      if sampler.cfg_mode == "independent":
        v = v_cond + sampler.cfg_text * (v_cond - no_text()) + sampler.cfg_speaker * (v_cond - no_speaker())
      elif sampler.cfg_mode == "joint":
        v_uncond = run(jnp.zeros_like(text_mask), jnp.zeros_like(speaker), jnp.zeros_like(speaker_mask))
        v = v_cond + sampler.cfg_scale * (v_cond - v_uncond)
      elif i % 2 == 0:
        v = v_cond + sampler.cfg_text * (v_cond - no_text())
      else:
        v = v_cond + sampler.cfg_speaker * (v_cond - no_speaker())
    if sampler.rescale_k is not None:
      snr = (1 - t) ** 2 / t**2
      ratio = (snr * sampler.rescale_sigma**2 + 1) / (snr * sampler.rescale_sigma**2 / sampler.rescale_k + 1)
      v = (ratio * ((1 - t) * v + x) - x) / (1 - t)
    x = x + v * (t_next - t)
  return x


@pytest.fixture(scope="module")
def setup():
  return tiny_setup()


# Steps: t = 0.999, 0.833, 0.666, 0.5, 0.333, 0.167. The CFG window [0.4, 0.9] guides steps 1-3 only, and speaker
# forcing (t >= 0.6) covers steps 0-2 of the first layer only.
WINDOW = dict(steps=6, cfg_min_t=0.4, cfg_max_t=0.9, truncation=0.8, rescale_k=1.2, rescale_sigma=3.0,
              speaker_kv_scale=1.7, speaker_kv_max_layers=1, speaker_kv_min_t=0.6)


@pytest.mark.parametrize("mode", ["independent", "joint", "alternating"])
def test_matches_slow_reference(setup, mode):
  cfg, params, inputs = setup
  sampler = SamplerConfig(cfg_mode=mode, cfg_text=2.0, cfg_speaker=3.0, cfg_scale=2.5, **WINDOW)
  key = jax.random.key(3)
  fast = np.asarray(sampling.sample(params, cfg, sampler, key, **inputs, frames=FRAMES))
  slow = reference_sample(cfg, params, sampler, key, inputs, FRAMES)
  # Guidance amplifies float32 rounding (batched vs separate matmuls) by up to 1 + 2 + 3 per step: about 7e-4 here.
  np.testing.assert_allclose(fast, slow, rtol=2e-3, atol=2e-3)
  if mode != "independent":
    return
  # The comparison is sensitive to each feature: without guidance, rescaling or forcing the result differs by > 0.1.
  for change in ({"cfg_text": 0.0, "cfg_speaker": 0.0}, {"rescale_k": None, "rescale_sigma": None},
                 {"speaker_kv_scale": None}):
    other = sampling.sample(params, cfg, SamplerConfig(**{**vars(sampler), **change}), key, **inputs, frames=FRAMES)
    assert np.max(np.abs(np.asarray(other) - slow)) > 0.1, change


def test_speaker_forcing_switches_off_below_min_t():
  sampler = SamplerConfig(**WINDOW)
  scales = sampling.speaker_kv_scales(sampler, layers=2)
  np.testing.assert_allclose(scales[:, 0], [1.7, 1.7, 1.7, 1.0, 1.0, 1.0])
  np.testing.assert_array_equal(scales[:, 1], np.ones(6))
  np.testing.assert_array_equal(sampling.guided_steps(sampler), [False, True, True, True, False, False])
  assert np.all(sampling.speaker_kv_scales(SamplerConfig(steps=4), layers=3) == 1.0)


def test_encoders_run_once_per_generation(setup, monkeypatch):
  """Counts executions (not traces) of encode_context and decode with host callbacks inside the compiled loop."""
  cfg, params, inputs = setup
  calls = {"encode": 0, "decode": 0}

  def counting(name, method):
    def wrapper(self, *args, **kwargs):
      jax.debug.callback(lambda: calls.__setitem__(name, calls[name] + 1))
      return method(self, *args, **kwargs)
    return wrapper

  monkeypatch.setattr(Echo, "encode_context", counting("encode", Echo.encode_context))
  monkeypatch.setattr(Echo, "decode", counting("decode", Echo.decode))
  # A window that guides some steps: the guided and the plain branch each count one decode per step.
  sampler = SamplerConfig(steps=7, cfg_min_t=0.3, truncation=0.9)
  latents = sampling.sample(params, cfg, sampler, jax.random.key(0), **inputs, frames=FRAMES)
  jax.block_until_ready(latents)
  jax.effects_barrier()
  assert calls == {"encode": 1, "decode": 7}


def test_blockwise_continuation_matches_reference():
  cfg, params, inputs = tiny_setup(blockwise=True, seed=2)
  sampler = SamplerConfig(steps=3, cfg_min_t=0.0, speaker_kv_scale=1.3, speaker_kv_min_t=0.5)
  continuation = jax.random.normal(jax.random.key(5), (BATCH, 6, cfg.latent_dim))
  key = jax.random.key(7)
  out = np.asarray(sampling.sample_blockwise(params, cfg, sampler, key, **inputs, block_sizes=(4, 3),
                                             continuation=continuation))
  assert out.shape == (BATCH, 13, cfg.latent_dim)
  np.testing.assert_array_equal(out[:, :6], np.asarray(continuation))
  # Block 0 sees the continuation; block 1 sees the continuation and block 0 (zeros elsewhere in the buffer).
  buffer = np.zeros((BATCH, 16, cfg.latent_dim), np.float32)
  buffer[:, :6] = continuation
  block0 = reference_sample(cfg, params, sampler, jax.random.fold_in(key, 0), inputs, 4, jnp.asarray(buffer), 6)
  np.testing.assert_allclose(out[:, 6:10], block0, rtol=2e-3, atol=2e-3)
  buffer[:, 6:10] = out[:, 6:10]
  block1 = reference_sample(cfg, params, sampler, jax.random.fold_in(key, 1), inputs, 3, jnp.asarray(buffer), 10)
  np.testing.assert_allclose(out[:, 10:], block1, rtol=2e-3, atol=2e-3)
  with pytest.raises(ValueError, match="blockwise config"):
    sampling.sample_blockwise(params, dataclasses.replace(cfg, blockwise=False), sampler, key, **inputs,
                              block_sizes=(4,))


@pytest.mark.parametrize("lengths, expected", [
    ((10, 0), 10),  # no silence at the end: nothing cropped
    ((6, 4), 6),  # speech then silence
    ((0, 10), 0),  # only silence
])
def test_end_of_speech(lengths, expected):
  rng = np.random.default_rng(0)
  pad = np.full(8, -1.6, np.float32)
  speech = rng.standard_normal((lengths[0], 8)).astype(np.float32)
  silence = pad + rng.normal(0, 0.03, (lengths[1], 8)).astype(np.float32)  # a trained model's small residual
  assert sampling.end_of_speech(np.concatenate([speech, silence]), pad) == expected


def test_end_of_speech_keeps_pauses_and_rejects_bad_shapes():
  pad = np.zeros(4, np.float32)
  latents = np.ones((12, 4), np.float32)
  latents[3:6] = 0.0  # a pause inside speech
  latents[9:] = 0.0
  assert sampling.end_of_speech(latents, pad) == 9
  latents[10] = 0.5  # a frame of speech inside the tail moves the end past it
  assert sampling.end_of_speech(latents, pad) == 11
  latents[11] = np.nan
  assert sampling.end_of_speech(latents, pad) == 12
  with pytest.raises(ValueError, match="pad latent"):
    sampling.end_of_speech(latents, np.zeros(5))


def test_presets_and_config_validation(tmp_path):
  presets = sampling.load_presets(str(REPO / "presets" / "sampler_presets.json"))
  assert {"balanced", "fast"} <= set(presets)
  assert presets["fast"].steps < presets["balanced"].steps
  upstream = tmp_path / "upstream.json"
  upstream.write_text(json.dumps({"x": {"num_steps": "40", "cfg_scale_text": "3.0", "cfg_scale_speaker": "8.0",
                                        "truncation_factor": "0.8", "rescale_k": "1.2", "rescale_sigma": "3.0"}}))
  loaded = sampling.load_presets(str(upstream))["x"]
  assert (loaded.steps, loaded.cfg_text, loaded.cfg_speaker, loaded.truncation) == (40, 3.0, 8.0, 0.8)
  with pytest.raises(ValueError, match="unknown sampler setting"):
    SamplerConfig.from_dict({"num_step": 3})
  with pytest.raises(ValueError, match="cfg_mode"):
    SamplerConfig(cfg_mode="both")
  with pytest.raises(ValueError, match="rescale_sigma"):
    SamplerConfig(rescale_k=1.0)
  # NaN passes every range check; it made a wav of full-scale DC, and a run exit 0.
  for field in ("cfg_scale", "truncation", "cfg_text", "speaker_kv_min_t"):
    with pytest.raises(ValueError, match=f"{field} must be a finite number, got nan"):
      SamplerConfig(**{field: float("nan")})
  with pytest.raises(ValueError, match="rescale_k must be a finite number, got inf"):
    SamplerConfig(rescale_k=float("inf"), rescale_sigma=3.0)
  with pytest.raises(ValueError, match="cfg_min_t=0.9 is above cfg_max_t=0.1: guidance would never apply"):
    SamplerConfig(cfg_min_t=0.9, cfg_max_t=0.1)
