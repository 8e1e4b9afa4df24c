"""Model properties a bug could silently break, and the parameter counts of every config."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from echo_jax.config import model_config
from echo_jax.model import Echo, echo
from echo_jax.model.layers import apply_rope, apply_rope_to_heads, rope_angles
from echo_jax.train.state import count_params, init_params


def abstract_param_count(name: str) -> int:
  config = load_config(name)
  model = Echo(model_config(config))
  return count_params(jax.eval_shape(lambda: init_params(model, jax.random.key(0), config)))


@pytest.mark.parametrize("name, low, high", [
    ("echo_1p3b", 1304e6 * 0.98, 1304e6 * 1.02),
    ("echo_840m", 800e6, 880e6),
    ("echo_base_fish", 2375e6, 2385e6),
    ("tiny", 1e5, 5e5),
    ("demo", 1e6, 6e7),
])
def test_param_counts(name, low, high):
  assert low <= abstract_param_count(name) <= high


@functools.cache
def tiny_model_and_inputs():
  """The tiny model, its fresh params, a jitted apply, and a batch with padded text and reference."""
  config = load_config("tiny")
  model = Echo(model_config(config))
  cfg = model.cfg
  batch, frames, text_len, ref_frames = 2, 12, 10, 16
  rng = np.random.default_rng(0)
  inputs = {
      "x_t": jnp.asarray(rng.standard_normal((batch, frames, cfg.latent_dim)), jnp.float32),
      "t": jnp.asarray(rng.uniform(size=batch), jnp.float32),
      "text": jnp.asarray(rng.integers(1, 256, (batch, text_len)), jnp.int32),
      "text_mask": jnp.asarray(np.arange(text_len)[None] < np.array([[6], [9]])),
      "speaker": jnp.asarray(rng.standard_normal((batch, ref_frames, cfg.latent_dim)), jnp.float32),
      "speaker_mask": jnp.asarray(np.arange(ref_frames)[None] < np.array([[8], [12]])),
  }
  params = nn.unbox(init_params(model, jax.random.key(0), config))
  apply = jax.jit(lambda params, inputs: model.apply({"params": params}, **inputs))
  return model, params, inputs, apply


def randomize(params, seed=1):
  """Non-zero everywhere (a fresh model's zero-initialised out_proj would hide every difference)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


def test_output_is_zero_at_init():
  _, params, inputs, apply = tiny_model_and_inputs()
  out = apply(params, inputs)
  assert out.shape == inputs["x_t"].shape
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_padded_text_and_speaker_positions_have_no_effect():
  _, params, inputs, apply = tiny_model_and_inputs()
  params = randomize(params)
  base = apply(params, inputs)
  rng = np.random.default_rng(5)
  changed = dict(inputs)
  text = np.asarray(inputs["text"]).copy()
  text[~np.asarray(inputs["text_mask"])] = rng.integers(1, 256, (~np.asarray(inputs["text_mask"])).sum())
  speaker = np.asarray(inputs["speaker"]).copy()
  speaker[~np.asarray(inputs["speaker_mask"])] = rng.standard_normal(speaker[~np.asarray(inputs["speaker_mask"])].shape)
  changed["text"], changed["speaker"] = jnp.asarray(text), jnp.asarray(speaker)
  np.testing.assert_allclose(apply(params, changed), base, rtol=1e-5, atol=1e-5)
  # The same change at a valid position does change the output: the check above can fail.
  text[0, 1] = (text[0, 1] % 255) + 1
  changed["text"] = jnp.asarray(text)
  assert not np.allclose(apply(params, changed), base, atol=1e-4)


def test_speaker_encoder_is_causal():
  model, params, inputs, _ = tiny_model_and_inputs()
  params = randomize(params)

  @jax.jit
  def speaker_state(speaker):
    return model.apply({"params": params}, speaker, method=lambda m, s: m.speaker_encoder(s))

  speaker = np.asarray(inputs["speaker"]).copy()
  base = speaker_state(jnp.asarray(speaker))
  speaker[:, 8:12] += 1.0  # frames 8..11 = patch 2
  changed = speaker_state(jnp.asarray(speaker))
  np.testing.assert_allclose(changed[:, :2], base[:, :2], rtol=1e-5, atol=1e-5)
  assert not np.allclose(changed[:, 2:], base[:, 2:], atol=1e-4)


def test_rope_rotates_interleaved_pairs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 5, 2, 8)).astype(np.float32)
  cos, sin = rope_angles(jnp.arange(5)[None], 8, 1e4)
  rotated = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
  # Reference: pairs (2i, 2i+1) as complex numbers times exp(i·pos·θ^(-2i/d)).
  pos = np.arange(5)[:, None]
  angle = pos * 1e4 ** (-np.arange(0, 8, 2) / 8)
  as_complex = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angle)[None, :, None, :]
  np.testing.assert_allclose(rotated[..., 0::2], as_complex.real, atol=1e-5)
  np.testing.assert_allclose(rotated[..., 1::2], as_complex.imag, atol=1e-5)


def test_rope_touches_only_first_half_of_decoder_heads(monkeypatch):
  model, params, inputs, _ = tiny_model_and_inputs()
  heads = model.cfg.heads
  calls = []

  def spy(x, cos, sin, n_rotated):
    out = apply_rope_to_heads(x, cos, sin, n_rotated)
    # Inside nn.scan the values are tracers; a callback hands the concrete arrays to the test.
    jax.debug.callback(lambda x, out: calls.append((np.asarray(x), np.asarray(out), n_rotated)), x, out)
    return out

  monkeypatch.setattr(echo, "apply_rope_to_heads", spy)
  model.apply({"params": randomize(params)}, **inputs)
  assert calls, "the decoder never applied RoPE"
  for x, out, n_rotated in calls:
    assert n_rotated == heads // 2 and x.shape[2] == heads
    np.testing.assert_array_equal(out[:, :, heads // 2:], x[:, :, heads // 2:])
    assert not np.allclose(out[:, 1:, :heads // 2], x[:, 1:, :heads // 2])  # position 0 has angle 0


def test_encode_context_then_decode_equals_call():
  model, params, inputs, apply = tiny_model_and_inputs()
  params = randomize(params)
  full = apply(params, inputs)
  context = model.apply({"params": params}, inputs["text"], inputs["text_mask"], inputs["speaker"],
                        inputs["speaker_mask"], method=Echo.encode_context)
  split = model.apply({"params": params}, inputs["x_t"], inputs["t"], context, method=Echo.decode)
  np.testing.assert_allclose(split, full, rtol=1e-5, atol=1e-5)  # jit vs eager fusion order


def test_blockwise_prefix_visibility():
  config = load_config("tiny")
  config.model.blockwise = True
  model = Echo(model_config(config))
  _, _, inputs, _ = tiny_model_and_inputs()
  params = randomize(init_params(model, jax.random.key(0), config))
  prefix = jax.random.normal(jax.random.key(3), (2, 16, model.cfg.latent_dim))

  def run(prefix, start_pos):
    return model.apply({"params": params}, **inputs, prefix=prefix, start_pos=start_pos)

  # Patches at frames >= start_pos are invisible: changing them changes nothing.
  changed = prefix.at[:, 8:].add(1.0)
  np.testing.assert_allclose(run(changed, 8), run(prefix, 8), rtol=1e-5, atol=1e-5)
  assert not np.allclose(run(changed, 12), run(prefix, 12), atol=1e-4)


def test_the_model_can_be_traced_from_two_threads_at_once(monkeypatch):
  """The trainer traces the train step while a thread traces the state's initialisation (and the eval step while the
  sample hook traces the sampler). Flax creates Module classes during a trace, editing their base classes' dataclass
  fields in place while the other thread may be reading them: seen once as "dictionary changed size during
  iteration" from a launch. Reading the fields slowly here (as a loaded machine would) makes that overlap likely on
  every run: several of the 16 traces failed in each try before traces of the model took turns."""
  import dataclasses
  import threading
  import time
  import types

  from flax.linen import kw_only_dataclasses, transforms

  class SlowFieldReads(types.ModuleType):
    def __getattr__(self, name):
      return getattr(dataclasses, name)

    @staticmethod
    def fields(cls_or_instance):
      return tuple(f for f in cls_or_instance.__dataclass_fields__.values()
                   if not time.sleep(0.002) and f._field_type is dataclasses._FIELD)

  slow = SlowFieldReads("dataclasses")
  monkeypatch.setattr(transforms, "dataclasses", slow)
  monkeypatch.setattr(kw_only_dataclasses, "dataclasses", slow)
  model, params, inputs, _ = tiny_model_and_inputs()
  config = load_config("tiny")
  traces = {
      "init": lambda: jax.eval_shape(lambda: init_params(model, jax.random.key(0), config)),
      "apply": lambda: jax.eval_shape(lambda p: model.apply({"params": p}, **inputs), params),
  }
  errors = []

  def trace_repeatedly(trace):
    for _ in range(8):
      try:
        trace()
      except Exception as error:  # noqa: BLE001 - every failure is collected and shown
        errors.append(repr(error))

  threads = [threading.Thread(target=trace_repeatedly, args=(trace,)) for trace in traces.values()]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors
