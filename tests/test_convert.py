"""Upstream weight import/export: the exact upstream layout, bitwise round trips, refusals, and fine-tuning start."""

import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import fake_gcs
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import REPO, load_config, write_synthetic_shards
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from echo_jax import checkpoint, convert
from echo_jax.checkpoint import load_params, save_params
from echo_jax.config import load_config_file, model_config
from echo_jax.data.pipeline import Pipeline
from echo_jax.data.shards import list_shards
from echo_jax.model import Echo
from echo_jax.train.loop import Trainer
from echo_jax.train.state import create_train_state
from echo_jax.train.step import train_step

TINY_CONFIG = str(REPO / "configs" / "tiny.py")


def upstream_shapes(m, blockwise: bool) -> dict[str, tuple[int, ...]]:
  """DESIGN §3 "Upstream parameter names", written out by hand from the upstream model: key -> [out, in] shape."""
  shapes = {"text_encoder.text_embedding.weight": (m.text_vocab, m.text_dim)}
  encoders = [("text_encoder", m.text_dim, m.text_heads, m.text_mlp_dim, m.text_layers),
              ("speaker_encoder", m.speaker_dim, m.speaker_heads, m.speaker_mlp_dim, m.speaker_layers)]
  if blockwise:
    encoders.append(("latent_encoder", m.speaker_dim, m.speaker_heads, m.speaker_mlp_dim, m.speaker_layers))
  for name, dim, heads, mlp, layers in encoders:
    for i in range(layers):
      block = f"{name}.blocks.{i}"
      for proj in ("wq", "wk", "wv", "wo", "gate"):
        shapes[f"{block}.attention.{proj}.weight"] = (dim, dim)
      shapes[f"{block}.attention.q_norm.weight"] = (heads, dim // heads)
      shapes[f"{block}.attention.k_norm.weight"] = (heads, dim // heads)
      shapes[f"{block}.mlp.w1.weight"] = (mlp, dim)
      shapes[f"{block}.mlp.w3.weight"] = (mlp, dim)
      shapes[f"{block}.mlp.w2.weight"] = (dim, mlp)
      shapes[f"{block}.attention_norm.weight"] = (dim,)
      shapes[f"{block}.mlp_norm.weight"] = (dim,)
    if name != "text_encoder":
      shapes[f"{name}.in_proj.weight"] = (m.speaker_dim, m.speaker_patch * m.latent_dim)
      shapes[f"{name}.in_proj.bias"] = (m.speaker_dim,)
  shapes["text_norm.weight"] = (m.text_dim,)
  shapes["speaker_norm.weight"] = (m.speaker_dim,)
  if blockwise:
    shapes["latent_norm.weight"] = (m.speaker_dim,)
  shapes["cond_module.0.weight"] = (m.dim, m.timestep_dim)
  shapes["cond_module.2.weight"] = (m.dim, m.dim)
  shapes["cond_module.4.weight"] = (3 * m.dim, m.dim)
  shapes["in_proj.weight"] = (m.dim, m.latent_dim)
  shapes["in_proj.bias"] = (m.dim,)
  contexts = [("text", m.text_dim), ("speaker", m.speaker_dim)] + ([("latent", m.speaker_dim)] if blockwise else [])
  for i in range(m.layers):
    block = f"blocks.{i}"
    for proj in ("wq", "wk", "wv", "wo", "gate"):
      shapes[f"{block}.attention.{proj}.weight"] = (m.dim, m.dim)
    for context, width in contexts:
      shapes[f"{block}.attention.wk_{context}.weight"] = (m.dim, width)
      shapes[f"{block}.attention.wv_{context}.weight"] = (m.dim, width)
    shapes[f"{block}.attention.q_norm.weight"] = (m.heads, m.dim // m.heads)
    shapes[f"{block}.attention.k_norm.weight"] = (m.heads, m.dim // m.heads)
    shapes[f"{block}.mlp.w1.weight"] = (m.mlp_dim, m.dim)
    shapes[f"{block}.mlp.w3.weight"] = (m.mlp_dim, m.dim)
    shapes[f"{block}.mlp.w2.weight"] = (m.dim, m.mlp_dim)
    for adaln in ("attention_adaln", "mlp_adaln"):
      for part in ("shift", "scale", "gate"):
        shapes[f"{block}.{adaln}.{part}_down.weight"] = (m.adaln_rank, m.dim)
        shapes[f"{block}.{adaln}.{part}_up.weight"] = (m.dim, m.adaln_rank)
        shapes[f"{block}.{adaln}.{part}_up.bias"] = (m.dim,)
  shapes["out_norm.weight"] = (m.dim,)
  shapes["out_proj.weight"] = (m.latent_dim, m.dim)
  shapes["out_proj.bias"] = (m.latent_dim,)
  return shapes


def config_for(name: str, blockwise: bool):
  config = load_config(name)
  config.model.blockwise = blockwise
  return config


@pytest.mark.parametrize("name", ["echo_base_fish", "tiny"])
@pytest.mark.parametrize("blockwise", [False, True])
def test_export_layout_is_upstream(name, blockwise):
  config = config_for(name, blockwise)
  expected = upstream_shapes(config.model, blockwise)
  abstract = convert.abstract_params(config)
  exported = jax.eval_shape(lambda p: convert.to_upstream(p, jnp.bfloat16), abstract)
  assert {key: tuple(s.shape) for key, s in exported.items()} == expected
  assert {s.dtype for s in exported.values()} == {jnp.dtype(jnp.bfloat16)}
  # The importer checks files against the same layout.
  assert {key: slot.shape for key, slot in convert.upstream_layout(abstract).items()} == expected
  if name == "echo_base_fish" and not blockwise:
    assert sum(np.prod(shape) for shape in expected.values()) == pytest.approx(2.3808e9, rel=1e-3)


def random_params(config, seed: int = 0):
  """Distinct random values everywhere (zero-initialised tensors would hide a mix-up)."""
  abstract = convert.abstract_params(config)
  leaves, treedef = jax.tree.flatten(abstract)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [rng.standard_normal(leaf.shape).astype(np.float32) for leaf in leaves])


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True):
    a = np.asarray(a)
    assert a.dtype == np.float32, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("blockwise", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bitwise(tmp_path, blockwise, dtype):
  config = config_for("tiny", blockwise)
  params = random_params(config)
  if dtype == "bfloat16":  # only bf16-representable values survive a bf16 file
    params = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  save_params(params, config, str(tmp_path / "ours"))
  upstream = str(tmp_path / "model.safetensors")
  convert.main(["export", str(tmp_path / "ours"), "--out", upstream, "--dtype", dtype])

  with safe_open(upstream, framework="np") as f:
    assert f.metadata() == {"format": "pt"}
    names = f.keys()
    assert {f.get_slice(key).get_dtype() for key in names} == {"F32" if dtype == "float32" else "BF16"}
  tensors = load_file(upstream)
  assert {key: value.shape for key, value in tensors.items()} == upstream_shapes(config.model, blockwise)

  flags = ["--blockwise"] if blockwise else []
  convert.main(["import", upstream, "--config", TINY_CONFIG, "--out", str(tmp_path / "back"), *flags])
  loaded_config, loaded = load_params(str(tmp_path / "back"))
  assert loaded_config.model.blockwise == blockwise
  assert_trees_equal(loaded, params)


def write_upstream(path, config, seed: int = 0) -> dict[str, np.ndarray]:
  """A file in the upstream layout (from the hand-written table), filled with distinct random values."""
  rng = np.random.default_rng(seed)
  tensors = {key: rng.standard_normal(shape).astype(np.float32)
             for key, shape in upstream_shapes(config.model, config.model.blockwise).items()}
  save_file(tensors, str(path))
  return tensors


def test_import_puts_each_tensor_in_its_place(tmp_path):
  """Spot checks written independently of the converter: transposition, layer order, renamed modules."""
  config = config_for("tiny", True)
  tensors = write_upstream(tmp_path / "model.safetensors", config)
  params = convert.import_upstream(str(tmp_path / "model.safetensors"), config, str(tmp_path / "out"))
  np.testing.assert_array_equal(params["blocks"]["attention"]["wq"]["kernel"][1],
                                tensors["blocks.1.attention.wq.weight"].T)
  np.testing.assert_array_equal(params["blocks"]["mlp"]["w2"]["kernel"][0], tensors["blocks.0.mlp.w2.weight"].T)
  np.testing.assert_array_equal(params["blocks"]["attention"]["k_norm"]["weight"][1],
                                tensors["blocks.1.attention.k_norm.weight"])
  np.testing.assert_array_equal(params["blocks"]["mlp_adaln"]["gate_up"]["bias"][1],
                                tensors["blocks.1.mlp_adaln.gate_up.bias"])
  np.testing.assert_array_equal(params["context_kv"]["wv_speaker"]["kernel"][1],
                                tensors["blocks.1.attention.wv_speaker.weight"].T)
  np.testing.assert_array_equal(params["context_kv"]["wk_latent"]["kernel"][0],
                                tensors["blocks.0.attention.wk_latent.weight"].T)
  np.testing.assert_array_equal(params["cond_module"]["linear_1"]["kernel"], tensors["cond_module.2.weight"].T)
  np.testing.assert_array_equal(params["cond_module"]["linear_2"]["kernel"], tensors["cond_module.4.weight"].T)
  np.testing.assert_array_equal(params["text_encoder"]["text_embedding"]["embedding"],
                                tensors["text_encoder.text_embedding.weight"])
  np.testing.assert_array_equal(params["latent_encoder"]["in_proj"]["bias"], tensors["latent_encoder.in_proj.bias"])
  np.testing.assert_array_equal(params["speaker_encoder"]["blocks"]["attention"]["gate"]["kernel"][0],
                                tensors["speaker_encoder.blocks.0.attention.gate.weight"].T)
  np.testing.assert_array_equal(params["out_proj"]["kernel"], tensors["out_proj.weight"].T)


def test_imported_model_matches_upstream_linear_semantics(tmp_path):
  """The imported model computes upstream's y = x W^T + b: with only in_proj/out_proj non-trivial, checked exactly."""
  config = config_for("tiny", False)
  m = config.model
  tensors = {key: np.zeros(shape, np.float32) for key, shape in upstream_shapes(m, False).items()}
  rng = np.random.default_rng(0)
  for key in ("in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias"):
    tensors[key] = rng.standard_normal(tensors[key].shape).astype(np.float32)
  for key in tensors:
    if key.endswith("norm.weight"):
      tensors[key] = np.ones_like(tensors[key])
  save_file(tensors, str(tmp_path / "model.safetensors"))
  params = convert.read_upstream(str(tmp_path / "model.safetensors"), config)
  x = rng.standard_normal((1, 8, m.latent_dim)).astype(np.float32)
  args = (jnp.zeros((1,)), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool), jnp.zeros((1, 8, m.latent_dim)),
          jnp.ones((1, 8), bool))
  out = np.asarray(jax.jit(Echo(model_config(config)).apply)({"params": params}, jnp.asarray(x), *args))
  # All blocks are zero, so the decoder is out_proj(out_norm(in_proj(x))), as upstream computes it.
  h = x @ tensors["in_proj.weight"].T + tensors["in_proj.bias"]
  h = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + m.norm_eps)
  np.testing.assert_allclose(out, h @ tensors["out_proj.weight"].T + tensors["out_proj.bias"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, named", [
    ("missing", "blocks.1.mlp.w3.weight"),
    ("extra", "blocks.2.mlp.w3.weight"),
    ("shape", "blocks.0.attention.q_norm.weight"),
    ("dtype", "out_proj.bias"),
])
def test_bad_file_is_refused_naming_the_tensor(tmp_path, change, named):
  config = config_for("tiny", False)
  tensors = write_upstream(tmp_path / "good.safetensors", config)
  if change == "missing":
    del tensors[named]
  elif change == "extra":
    tensors[named] = np.zeros((192, 64), np.float32)
  elif change == "shape":
    tensors[named] = tensors[named].reshape(-1)
  else:
    tensors[named] = tensors[named].astype(np.int32)
  save_file(tensors, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ValueError, match=named.replace(".", r"\.")):
    convert.import_upstream(str(tmp_path / "bad.safetensors"), config, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_blockwise_modules_need_a_decision(tmp_path):
  blockwise_file = tmp_path / "blockwise.safetensors"
  tensors = write_upstream(blockwise_file, config_for("tiny", True))
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match="--drop_blockwise"):
    convert.main(["import", str(blockwise_file), "--config", TINY_CONFIG, "--out", out])

  convert.main(["import", str(blockwise_file), "--config", TINY_CONFIG, "--out", out, "--drop_blockwise",
                "--dtype", "bfloat16"])
  config, params = load_params(out)
  assert not config.model.blockwise and config.model.dtype == "bfloat16"
  assert "latent_encoder" not in params and "wk_latent" not in params["context_kv"]
  np.testing.assert_array_equal(params["context_kv"]["wk_text"]["kernel"][1],
                                tensors["blocks.1.attention.wk_text.weight"].T)

  plain_file = tmp_path / "plain.safetensors"
  write_upstream(plain_file, config_for("tiny", False))
  with pytest.raises(ValueError, match="has no blockwise modules"):
    convert.main(["import", str(plain_file), "--config", TINY_CONFIG, "--out", out, "--blockwise"])


def write_pca(path, latent_dim: int, codec_dim: int = 12):
  rng = np.random.default_rng(0)
  save_file({"pca_components": rng.standard_normal((latent_dim, codec_dim)).astype(np.float32),
             "pca_mean": rng.standard_normal((codec_dim,)).astype(np.float32),
             "latent_scale": np.array(1.5, np.float32)}, str(path))


def test_pca_state_is_checked_and_carried(tmp_path):
  config = config_for("tiny", False)
  write_upstream(tmp_path / "model.safetensors", config)
  write_pca(tmp_path / "pca.safetensors", config.model.latent_dim)
  convert.import_upstream(str(tmp_path / "model.safetensors"), config, str(tmp_path / "out"),
                          pca=str(tmp_path / "pca.safetensors"))
  assert (tmp_path / "out" / convert.PCA_FILE).read_bytes() == (tmp_path / "pca.safetensors").read_bytes()

  write_pca(tmp_path / "wrong.safetensors", latent_dim=80)
  with pytest.raises(ValueError, match="pca_components"):
    convert.import_upstream(str(tmp_path / "model.safetensors"), config, str(tmp_path / "out2"),
                            pca=str(tmp_path / "wrong.safetensors"))


def test_init_params_are_checked_against_the_config(tmp_path):
  config = config_for("tiny", False)
  write_upstream(tmp_path / "model.safetensors", config)
  convert.import_upstream(str(tmp_path / "model.safetensors"), config, str(tmp_path / "out"))
  wider = config_for("tiny", False)
  wider.model.mlp_dim = 256
  with pytest.raises(ValueError, match=r"blocks/mlp/w1/kernel is float32\[2, 64, 192\] in the checkpoint, this "
                                       r"config needs float32\[2, 64, 256\]; blocks/mlp/w2/kernel"):
    convert.load_init_params(str(tmp_path / "out"), wider)
  with pytest.raises(ValueError, match=r"context_kv/wk_latent/kernel is missing.*\(is model.blockwise the same"):
    convert.load_init_params(str(tmp_path / "out"), config_for("tiny", True))
  # An upstream file is converted on the fly; its blockwise tensors follow the config.
  direct = convert.load_init_params(str(tmp_path / "model.safetensors"), config)
  assert_trees_equal(direct, jax.tree.map(np.asarray, convert.load_init_params(str(tmp_path / "out"), config)))


def test_training_starts_from_imported_weights(tmp_path):
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards")
  config.train.steps = 1
  tensors = write_upstream(tmp_path / "model.safetensors", config)
  # Small weights keep the loss in a sensible range; out_proj is non-zero, so the loss depends on every block.
  save_file({key: 0.3 * value for key, value in tensors.items()}, str(tmp_path / "model.safetensors"))
  convert.main(["import", str(tmp_path / "model.safetensors"), "--config", TINY_CONFIG, "--out", str(tmp_path / "w")])
  init = convert.load_init_params(str(tmp_path / "w"), config)

  Trainer(config, str(tmp_path / "run"), init_params=init).run()
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  first_loss = next(record["loss"] for record in logged if "loss" in record)

  # The same batch: a pipeline with the trainer's arguments (seed, one process, the global batch), and the same
  # keys: train_step folds the step (0) into jax.random.key(config.seed), as the trainer's compiled step does.
  # The trainer shards the batch over 8 CPU devices, so sums may run in another order: equal to float32 rounding.
  with Pipeline(shards=list_shards(config.data.train_shards), batch_size=config.train.batch_size,
                latent_dim=config.model.latent_dim, max_text_len=config.data.max_text_len,
                max_frames=config.data.max_frames, max_ref_frames=config.data.max_ref_frames,
                pad_latent=np.zeros(config.model.latent_dim, np.float32), seed=config.seed,
                prefetch=config.data.prefetch) as pipeline:
    batch = jax.tree.map(jnp.asarray, next(pipeline))
  model = Echo(model_config(config))

  fresh_state = jax.jit(lambda: create_train_state(model, jax.random.key(config.seed), config))()
  step = jax.jit(lambda state: train_step(state, batch, model=model, config=config,
                                          base_key=jax.random.key(config.seed))[1]["loss"])
  imported_loss = float(step(fresh_state.replace(params=jax.tree.map(jnp.asarray, init))))
  assert first_loss == pytest.approx(imported_loss, rel=1e-5)
  fresh_loss = float(step(fresh_state))
  assert fresh_loss != pytest.approx(imported_loss, rel=1e-3)  # the check above tells the two apart

  # The run directory exports back to the upstream layout (what a fine-tuned model is shipped as).
  convert.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "tuned.safetensors"), "--dtype", "bfloat16"])
  tuned = load_file(str(tmp_path / "tuned.safetensors"))
  assert {key: value.shape for key, value in tuned.items()} == upstream_shapes(config.model, False)
  assert tuned["out_proj.bias"].dtype == ml_dtypes.bfloat16


def test_unreadable_inputs_are_refused(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    load_config_file(str(pathlib.Path(tmp_path) / "missing.py"))
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
    convert.main(["import", str(tmp_path / "model.safetensors"), "--config", TINY_CONFIG, "--out", str(tmp_path / "o")])
  with pytest.raises(ValueError, match=r"gs://b/model.safetensors: .* read from a local path; .* --out "
                                       r"gs://BUCKET/converted\) and train every host with"):
    convert.load_init_params("gs://b/model.safetensors", load_config("tiny"))


def test_a_damaged_converted_directory_is_refused_by_its_checksums(tmp_path):
  """Orbax restores a flipped bit without complaint: the checksums saved beside the parameters find it, for
  inference and --init_from alike (both `load_params`)."""
  config = config_for("tiny", False)
  write_upstream(tmp_path / "model.safetensors", config)
  params = convert.import_upstream(str(tmp_path / "model.safetensors"), config, str(tmp_path / "out"))
  assert_trees_equal(load_params(str(tmp_path / "out"))[1], params)  # whole, it loads
  name, largest = max(((jax.tree_util.keystr(path, simple=True, separator="/"), leaf)
                       for path, leaf in jax.tree_util.tree_leaves_with_path(params)), key=lambda item: item[1].size)
  pattern = largest.reshape(-1)[largest.size // 2:largest.size // 2 + 16].tobytes()
  files = [p for p in (tmp_path / "out" / "params").rglob("*") if p.is_file() and pattern in p.read_bytes()]
  assert len(files) == 1
  data = bytearray(files[0].read_bytes())
  data[data.index(pattern)] ^= 1  # the lowest mantissa bit of one weight
  files[0].write_bytes(bytes(data))
  with pytest.raises(checkpoint.ChecksumMismatch, match=rf"out: arrays that differ from those saved: {name}\. This "
                                                        r"copy of the parameters is damaged"):
    convert.load_init_params(str(tmp_path / "out"), config)


IMPORT_TO_GCS = textwrap.dedent("""\
    import sys
    from echo_jax import convert
    convert.main(["import", *sys.argv[1:]])
""")


def test_import_writes_into_gs(tmp_path):
  """A pod's hosts all read --init_from: converted once into gs://, the weights are where every host reads them
  (here the GCS stand-in, tests/fake_gcs.py). Before, the output went to a local directory named "gs:"."""
  config = config_for("tiny", False)
  write_upstream(tmp_path / "model.safetensors", config)
  write_pca(tmp_path / "pca.safetensors", config.model.latent_dim)
  (tmp_path / "gcs" / "bucket").mkdir(parents=True)
  with fake_gcs.serve(str(tmp_path / "gcs")) as gcs:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_TO_GCS, str(tmp_path / "model.safetensors"), "--config", TINY_CONFIG,
         "--out", "gs://bucket/converted", "--pca", str(tmp_path / "pca.safetensors"), "--drop_blockwise"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=fake_gcs.subprocess_env(gcs.url))
  assert result.returncode == 0, result.stderr[-3000:]
  converted = tmp_path / "gcs" / "bucket" / "converted"
  assert sorted(p.name for p in converted.iterdir()) == ["checksums.json", "config.json", "params",
                                                         convert.PCA_FILE]
  assert (converted / convert.PCA_FILE).read_bytes() == (tmp_path / "pca.safetensors").read_bytes()
  assert not (tmp_path / "gs:").exists()
  local = convert.import_upstream(str(tmp_path / "model.safetensors"), config, str(tmp_path / "local"))
  assert_trees_equal(convert.load_init_params(str(converted), config), local)


def test_a_relaunch_resumes_without_reading_its_init_weights_again(tmp_path):
  """`--init_from` starts a new run; the same command relaunched after a preemption resumes the run's checkpoint,
  even when those weights are gone (the entry script hands the Trainer this loader, called for a new run only)."""
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards")
  config.train.update(steps=2, ckpt_every=2, log_every=1)
  tensors = write_upstream(tmp_path / "model.safetensors", config)
  save_file({key: 0.3 * value for key, value in tensors.items()}, str(tmp_path / "model.safetensors"))
  convert.import_upstream(str(tmp_path / "model.safetensors"), config, str(tmp_path / "w"))
  run = tmp_path / "run"
  Trainer(config, str(run), init_params=functools.partial(convert.load_init_params, str(tmp_path / "w"), config)).run()

  config.train.steps = 4
  gone = functools.partial(convert.load_init_params, str(tmp_path / "deleted"), config)
  Trainer(config, str(run), init_params=gone).run()
  events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
  assert [e["step"] for e in events if e["event"] == "init_params_ignored"] == [2]
  assert [e["step"] for e in events if e["event"] == "checkpoint_restored"] == [2]
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4
  # A new run with a wrong path fails before its compile, naming the path.
  with pytest.raises(FileNotFoundError, match="deleted"):
    Trainer(config, str(tmp_path / "other_run"), init_params=gone).run()
  assert not list((tmp_path / "other_run").glob("checkpoints/*/"))


def test_a_pickle_without_a_config_beside_it_is_read_with_the_training_config(tmp_path):
  config = load_config("tiny")
  state = jax.jit(lambda: create_train_state(Echo(model_config(config)), jax.random.key(3), config))()
  checkpoint.export_pickle(state, samples_seen=0, path=str(tmp_path / "w.pkl"))
  assert_trees_equal(convert.load_init_params(str(tmp_path / "w.pkl"), config), jax.tree.map(np.asarray, state.params))
  wider = load_config("tiny")
  wider.model.mlp_dim = 256
  with pytest.raises(ValueError, match=r"w\.pkl: parameter \['blocks'\]\['mlp'\]\['w1'\]\['kernel'\] has shape"):
    convert.load_init_params(str(tmp_path / "w.pkl"), wider)
  other = config_for("tiny", not load_config("tiny").model.blockwise)  # other arrays, not only other shapes
  with pytest.raises(ValueError, match=r"w\.pkl: its parameters are not those of the config: .*context_kv"):
    convert.load_init_params(str(tmp_path / "w.pkl"), other)


def test_an_output_that_cannot_be_written_is_refused_before_the_work_and_leaves_nothing(tmp_path, monkeypatch):
  """`export --out DIR` did the whole export, then failed and left DIR.partial, a file of the model's size, beside
  DIR; `import --out RUN` replaced a training run's config.json (both found by review)."""
  config = config_for("tiny", False)
  save_params(random_params(config), config, str(tmp_path / "ours"))
  (tmp_path / "out").mkdir()
  loads = []
  monkeypatch.setattr(convert, "load_params", lambda path: loads.append(path))
  with pytest.raises(IsADirectoryError, match="is a directory: give a file name in it"):
    convert.main(["export", str(tmp_path / "ours"), "--out", str(tmp_path / "out")])
  assert loads == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ours", "out"]
  monkeypatch.undo()

  def save_fails(tensors, path, metadata):
    pathlib.Path(path).write_bytes(b"half")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(convert, "save_file", save_fails)
  with pytest.raises(OSError, match="No space left"):
    convert.main(["export", str(tmp_path / "ours"), "--out", str(tmp_path / "model.safetensors")])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "out"]
  monkeypatch.undo()

  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text("{}")
  convert.main(["export", str(tmp_path / "ours"), "--out", str(tmp_path / "model.safetensors")])
  umask = os.umask(0)
  os.umask(umask)
  assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' own 0600
  with pytest.raises(ValueError, match=r"run is a run directory \(it holds checkpoints\): its config.json would be "
                                       "replaced; give a new directory"):
    convert.main(["import", str(tmp_path / "model.safetensors"), "--config", TINY_CONFIG, "--out", str(run)])
  assert (run / "config.json").read_text() == "{}" and sorted(p.name for p in run.iterdir()) == [
      "checkpoints", "config.json"]
