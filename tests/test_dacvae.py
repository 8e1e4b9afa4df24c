"""DACVAE in JAX: weight conversion, layer semantics against naive numpy, shapes, jit, bad weights refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax.codecs import Codec
from echo_jax.codecs import dacvae as dv
from echo_jax.codecs import dacvae_convert as dc

# Same strides, hop and latent width as the published model, narrow channels so a CPU run is cheap.
SMALL = dv.DacvaeConfig(encoder_dim=4, latent_dim=64, decoder_dim=96, wm_channels=2, wm_hidden=32, wm_latent_dim=8)
SR = 48000


def random_state_dict(config, seed=0):
  """A state dict with the reference key names and shapes, values scaled to keep activations finite."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in dv.state_dict_shapes(config).items():
    if key.endswith(".weight_g"):
      sd[key] = rng.uniform(0.5, 1.0, shape)
    elif key.endswith(".alpha"):
      sd[key] = rng.uniform(0.5, 1.5, shape)
    else:
      sd[key] = 0.1 * rng.standard_normal(shape)
  return {k: v.astype(np.float32) for k, v in sd.items()}


@pytest.fixture(scope="module")
def state_dict():
  return random_state_dict(SMALL)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, state_dict):
  path = tmp_path_factory.mktemp("dacvae") / "dacvae.safetensors"
  dc.save_dacvae(dc.convert_state_dict(state_dict, SMALL), SMALL, path)
  return path


@pytest.fixture(scope="module")
def codec(weights_file):
  return dv.DacvaeCodec(weights_file)


# --- naive references of the torch layer semantics -------------------------------------------------------------


def naive_conv1d(x, w, b, stride, dilation, pad):
  """torch Conv1d, x [L, C_in], w [C_out, C_in, k], pad (left, right)."""
  x = np.pad(x, (pad, (0, 0)))
  k = w.shape[-1]
  n_out = (x.shape[0] - dilation * (k - 1) - 1) // stride + 1
  out = np.zeros((n_out, w.shape[0]))
  for t in range(n_out):
    for j in range(k):
      out[t] += w[:, :, j] @ x[t * stride + j * dilation]
  return out + b


def naive_conv_transpose1d(x, w, b, stride, padding, output_padding):
  """torch ConvTranspose1d by its scatter definition, x [L, C_in], w [C_in, C_out, k]."""
  length, k = x.shape[0], w.shape[-1]
  n_out = (length - 1) * stride - 2 * padding + k + output_padding
  full = np.zeros(((length - 1) * stride + k + output_padding, w.shape[1]))
  for i in range(length):
    for j in range(k):
      full[i * stride + j] += x[i] @ w[:, :, j]
  return full[padding: padding + n_out] + b


def naive_lstm(x, weights, layers):
  """torch nn.LSTM from zero state, x [T, C], gate order i, f, g, o."""
  sigmoid = lambda a: 1 / (1 + np.exp(-a))
  for layer in range(layers):
    w_ih, w_hh, b_ih, b_hh = weights[layer]
    h = np.zeros(w_hh.shape[1])
    c = np.zeros_like(h)
    out = []
    for x_t in x:
      i, f, g, o = np.split(w_ih @ x_t + b_ih + w_hh @ h + b_hh, 4)
      c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
      h = sigmoid(o) * np.tanh(c)
      out.append(h)
    x = np.stack(out)
  return x


@pytest.mark.parametrize("stride,padding,output_padding", [(2, 1, 0), (5, 3, 1), (4, 0, 0)])
def test_conv_transpose1d_matches_torch_definition(stride, padding, output_padding):
  rng = np.random.default_rng(1)
  x, w, b = rng.standard_normal((9, 3)), rng.standard_normal((3, 4, 2 * stride)), rng.standard_normal(4)
  got = dv.conv_transpose1d(jnp.asarray(x[None], jnp.float32), jnp.asarray(w, jnp.float32),
                            jnp.asarray(b, jnp.float32), stride=stride, padding=padding,
                            output_padding=output_padding)
  np.testing.assert_allclose(got[0], naive_conv_transpose1d(x, w, b, stride, padding, output_padding),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length,kernel,stride,dilation,pad", [(20, 7, 1, 3, (9, 9)), (24, 8, 4, 1, (2, 2)),
                                                               (23, 10, 5, 1, dv.causal_padding(23, 10, 5))])
def test_conv1d_matches_torch_definition(length, kernel, stride, dilation, pad):
  rng = np.random.default_rng(2)
  x, w, b = rng.standard_normal((length, 3)), rng.standard_normal((5, 3, kernel)), rng.standard_normal(5)
  got = dv.conv1d(jnp.asarray(x[None], jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
                  stride=stride, dilation=dilation, padding=pad)
  np.testing.assert_allclose(got[0], naive_conv1d(x, w, b, stride, dilation, pad), rtol=1e-5, atol=1e-5)


def test_causal_padding_matches_reference_rule():
  # Stride 1: k - 1 on the left only; stride s, kernel 2s: s on the left, right tops up to a multiple of s.
  assert dv.causal_padding(100, 3, 1) == (2, 0)
  assert dv.causal_padding(100, 16, 8) == (8, 4)
  assert dv.causal_padding(96, 16, 8) == (8, 0)


def test_lstm_matches_torch_definition():
  rng = np.random.default_rng(3)
  size, layers = 6, 2
  x = rng.standard_normal((11, size))
  weights = [tuple(0.5 * rng.standard_normal(s) for s in ((4 * size, size), (4 * size, size), (4 * size,),
                                                           (4 * size,))) for _ in range(layers)]
  params = {}
  for i, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
    params |= {f"l.weight_ih_l{i}": w_ih, f"l.weight_hh_l{i}": w_hh, f"l.bias_ih_l{i}": b_ih,
               f"l.bias_hh_l{i}": b_hh}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  got = dv.lstm(jnp.asarray(x[None], jnp.float32), params, "l", layers)
  np.testing.assert_allclose(got[0], naive_lstm(x, weights, layers), rtol=1e-5, atol=1e-5)


def test_snake():
  x, alpha = jnp.array([[[0.5, -2.0]]]), jnp.array([[[2.0], [0.25]]])
  want = np.array([0.5 + np.sin(1.0) ** 2 / 2.0, -2.0 + np.sin(-0.5) ** 2 / 0.25])
  np.testing.assert_allclose(dv.snake(x, alpha)[0, 0], want, rtol=1e-6)


# --- key table and conversion -----------------------------------------------------------------------------------


def test_published_key_table():
  shapes = dv.state_dict_shapes(dv.DacvaeConfig())
  # Shapes that follow from the reference architecture (64-channel encoder, 1536-channel decoder, 128-d VAE).
  assert shapes["encoder.block.0.weight_v"] == (64, 1, 7)
  assert shapes["encoder.block.4.block.4.weight_v"] == (1024, 512, 24)
  assert shapes["encoder.block.6.weight_v"] == (1024, 1024, 3)
  assert shapes["quantizer.in_proj.weight_v"] == (256, 1024, 1)
  assert shapes["quantizer.out_proj.weight_g"] == (1024, 1, 1)
  assert shapes["decoder.model.1.block.1.weight_g"] == (1536, 1, 1)  # ConvTranspose1d: g over input channels
  assert shapes["decoder.model.1.block.1.weight_v"] == (1536, 768, 24)
  assert shapes["decoder.model.1.block.3.weight"] == (512, 256, 16)
  assert shapes["decoder.model.1.block.11.weight"] == (512, 256, 16)
  assert shapes["decoder.model.4.block.6.block.1.weight"] == (16, 32, 3)
  assert shapes["decoder.wm_model.encoder_block.pre.1.weight_v"] == (1, 96, 7)
  assert shapes["decoder.wm_model.encoder_block.post.0.lstm.weight_hh_l1"] == (2048, 512)
  assert shapes["decoder.wm_model.msg_processor.msg_processor.weight"] == (32, 128)
  assert shapes["decoder.wm_model.decoder_block.post.1.weight"] == (1, 32, 7)
  assert "decoder.model.1.block.9.weight" not in shapes  # the reference's Identity slot has no weights


def test_reference_kwargs_give_published_config():
  kwargs = {"encoder_dim": 64, "encoder_rates": [2, 8, 10, 12], "latent_dim": None, "decoder_dim": 1536,
            "decoder_rates": [12, 10, 8, 2], "n_codebooks": 16, "codebook_size": 1024, "codebook_dim": 128,
            "quantizer_dropout": False, "sample_rate": 48000}
  assert dv.DacvaeConfig.from_reference_kwargs(kwargs) == dv.DacvaeConfig()
  with pytest.raises(ValueError, match="wm_colour"):
    dv.DacvaeConfig.from_reference_kwargs({"wm_colour": 1})


def test_inconsistent_config_refused():
  with pytest.raises(ValueError, match="wm_channels"):
    dv.DacvaeConfig(decoder_dim=96, wm_hidden=32)


def test_fold_weight_norm(state_dict):
  params = dc.convert_state_dict(state_dict, SMALL)
  for name in ("decoder.model.1.block.1", "encoder.block.1.block.4"):  # a ConvTranspose1d and a Conv1d
    g, v = state_dict[f"{name}.weight_g"], state_dict[f"{name}.weight_v"]
    want = g * v / np.linalg.norm(v.reshape(v.shape[0], -1), axis=1)[:, None, None]
    np.testing.assert_allclose(params[f"{name}.weight"], want, rtol=1e-6)
    norms = np.linalg.norm(params[f"{name}.weight"].reshape(v.shape[0], -1), axis=1)
    np.testing.assert_allclose(norms, g.reshape(-1), rtol=1e-5)


def test_round_trip_is_exact(state_dict, weights_file):
  params = dc.convert_state_dict(state_dict, SMALL)
  config, loaded = dv.load_dacvae(weights_file)
  assert config == SMALL
  assert loaded.keys() == params.keys() == dv.param_shapes(SMALL).keys()
  for key, value in params.items():
    assert loaded[key].dtype == np.float32
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_parametrization_key_names_accepted(state_dict):
  renamed = {}
  for key, value in state_dict.items():
    key = key.replace(".weight_g", ".parametrizations.weight.original0")
    renamed[key.replace(".weight_v", ".parametrizations.weight.original1")] = value
  converted, want = dc.convert_state_dict(renamed, SMALL), dc.convert_state_dict(state_dict, SMALL)
  for key, value in want.items():
    np.testing.assert_array_equal(converted[key], value)


BAD_KEY = "decoder.model.2.block.4.block.1.weight_v"


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_bad_state_dict_refused_naming_key(state_dict, change):
  sd = dict(state_dict)
  if change == "missing":
    del sd[BAD_KEY]
    key = BAD_KEY
  elif change == "extra":
    key = "decoder.model.2.block.9.weight"
    sd[key] = np.zeros(3, np.float32)
  else:
    sd[BAD_KEY] = sd[BAD_KEY][..., :-1]
    key = BAD_KEY
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    dc.convert_state_dict(sd, SMALL)


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_bad_safetensors_refused_naming_key(tmp_path, state_dict, change):
  params = dc.convert_state_dict(state_dict, SMALL)
  key = "quantizer.out_proj.weight"
  if change == "missing":
    del params[key]
  elif change == "extra":
    key = "quantizer.out_proj.weight_g"
    params[key] = np.ones((64, 1, 1), np.float32)
  else:
    params[key] = params[key][:-1]
  path = tmp_path / "bad.safetensors"
  dc.save_dacvae(params, SMALL, path)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    dv.load_dacvae(path)


def test_a_damaged_weights_file_is_refused_with_what_to_do(tmp_path, weights_file):
  """safetensors' own error is neither an OSError nor a ValueError: inference printed it as a traceback (found by
  review)."""
  whole = weights_file.read_bytes()
  for name, data in (("cut.safetensors", whole[: len(whole) // 2]), ("garbage.safetensors", b"not safetensors" * 4)):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=f"{name} is not a readable safetensors file .*convert the weights again"):
      dv.load_dacvae(tmp_path / name)


# --- the codec --------------------------------------------------------------------------------------------------


def test_codec_protocol_and_constants(codec):
  assert isinstance(codec, Codec)
  assert (codec.sample_rate, codec.frame_rate, codec.latent_dim) == (48000, 25.0, 128)
  assert codec.config.hop_length == 1920


def test_one_second_round_trip(codec):
  audio = 0.1 * np.random.default_rng(4).standard_normal(SR).astype(np.float32)
  latents = codec.encode(audio)
  assert latents.shape == (25, 128) and latents.dtype == np.float32
  out = codec.decode(latents)
  assert out.shape == (25 * 1920,) and out.dtype == np.float32
  assert np.isfinite(out).all() and np.std(out) > 0
  # A partial frame is padded up to a whole one.
  assert codec.encode(audio[:SR - 100]).shape == (25, 128)
  assert codec.encode(np.concatenate([audio, audio[:1]])).shape == (26, 128)


def test_thirty_seconds_shapes(codec):
  latents = codec.encode(np.zeros(30 * SR, np.float32))
  assert latents.shape == (750, 128)
  assert codec.decode(latents).shape == (750 * 1920,)


def test_thirty_seconds_shapes_published_size():
  config = dv.DacvaeConfig()
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in dv.param_shapes(config).items()}
  latents = jax.eval_shape(lambda p, a: dv.encode(p, a, config), params,
                           jax.ShapeDtypeStruct((1, 30 * SR), jnp.float32))
  assert latents.shape == (1, 750, 128)
  audio = jax.eval_shape(lambda p, z: dv.decode(p, z, config), params, latents)
  assert audio.shape == (1, 750 * 1920)


def test_encode_decode_under_jit(codec):
  audio = 0.1 * np.random.default_rng(5).standard_normal((2, SR)).astype(np.float32)

  @jax.jit
  def round_trip(params, audio):
    return dv.decode(params, dv.encode(params, audio, SMALL), SMALL)

  out = round_trip(codec.params, jnp.asarray(audio))
  assert out.shape == (2, SR)
  want = codec.decode(codec.encode(audio[1]))
  np.testing.assert_allclose(out[1], want, rtol=1e-4, atol=1e-5)


def test_watermark_branch_is_in_the_output(weights_file):
  latents = np.random.default_rng(6).standard_normal((4, 128)).astype(np.float32)
  zeros = dv.DacvaeCodec(weights_file).decode(latents)
  ones = dv.DacvaeCodec(weights_file, message=[1] * 16).decode(latents)
  assert np.abs(zeros - ones).max() > 1e-4
  with pytest.raises(ValueError, match="bits"):
    dv.DacvaeCodec(weights_file, message=[2] * 16)


def test_pad_latent_is_encoded_silence(codec):
  pad = codec.pad_latent
  assert pad.shape == (128,)
  np.testing.assert_allclose(pad, codec.encode(np.zeros(SR, np.float32))[12], rtol=1e-6)
  assert codec.pad_latent is pad


def test_bad_inputs_refused(codec):
  with pytest.raises(ValueError, match="mono"):
    codec.encode(np.zeros((2, SR), np.float32))
  with pytest.raises(ValueError, match="mono"):
    codec.encode(np.zeros(0, np.float32))
  with pytest.raises(ValueError, match="latents"):
    codec.decode(np.zeros((3, 64), np.float32))
  with pytest.raises(ValueError, match="hop"):
    dv.encode(codec.params, jnp.zeros((1, 1000)), SMALL)
