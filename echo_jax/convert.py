"""Import and export of the released upstream Echo weights (PyTorch safetensors <-> our parameter tree).

    python -m echo_jax.convert import pytorch_model.safetensors --config configs/echo_base_fish.py --out converted/ \
        [--pca pca_state.safetensors] [--drop_blockwise | --blockwise] [--dtype float32|bfloat16]
    python -m echo_jax.convert export CHECKPOINT --out model.safetensors [--dtype float32|bfloat16]

Upstream (jordandare/echo-tts `model.py`, DESIGN §3) keeps one PyTorch module per layer and Linear weights as
[out, in]; we keep each stack of layers as one `nn.scan`ned module (layer axis first) and Dense kernels as [in, out].
The mapping between the two is derived from the names of our parameter tree, so it follows the model code:

    ours                                      upstream
    <...>/blocks/<m>/kernel   [N, in, out]    <...>.blocks.{i}.<m>.weight   [out, in]  (i < N, transposed)
    context_kv/<wk_text..>/kernel             blocks.{i}.attention.<wk_text..>.weight
    cond_module/linear_{0,1,2}/kernel         cond_module.{0,2,4}.weight  (nn.Sequential with SiLUs between)
    text_encoder/text_embedding/embedding     text_encoder.text_embedding.weight
    */weight, */bias                          *.weight, *.bias  (norm scales, per-head norms [H, hd], biases)

The blockwise modules (`latent_encoder.*`, `latent_norm`, `blocks.{i}.attention.{wk,wv}_latent`) are in the
released file; upstream inference drops them unless it generates blockwise. Imported parameters are float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from echo_jax import checkpoint, storage
from echo_jax.checkpoint import load_params, save_params
from echo_jax.config import load_config_file, model_config
from echo_jax.data.cache import is_local
from echo_jax.model import Echo
from echo_jax.train.state import init_params

PCA_FILE = "pca_state.safetensors"
PCA_KEYS = ("pca_components", "pca_mean", "latent_scale")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# Modules of ours that `scan_layers` stacks: their parameters carry the layer axis first.
_SCANNED = ("blocks", "context_kv")
_FLOAT_KINDS = ("F32", "BF16", "F16", "F64")


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one upstream tensor lives in our tree: `params[path][layer]`, transposed for Linear weights."""

  path: tuple[str, ...]
  layer: int | None
  transpose: bool
  shape: tuple[int, ...]  # the upstream shape


def is_blockwise_key(key: str) -> bool:
  """True for the upstream tensors of the blockwise extension (the latent-prefix encoder and its K/V)."""
  return key.startswith(("latent_encoder.", "latent_norm.")) or ".wk_latent." in key or ".wv_latent." in key


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes of `config`'s parameter tree (nothing allocated)."""
  model = Echo(model_config(config))
  return jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0), config)))


def _path(key_path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(str(part.key) for part in key_path)


def _upstream_key(path: tuple[str, ...], layer: int | None) -> str:
  *modules, leaf = path
  if modules[0] == "context_kv":  # our separately scanned context projections live in upstream's attention
    modules = ["blocks", "attention", *modules[1:]]
  if modules[0] == "cond_module":  # nn.Sequential(Linear, SiLU, Linear, SiLU, Linear): Linears at 0, 2, 4
    modules = ["cond_module", str(2 * int(modules[1].removeprefix("linear_")))]
  parts = []
  for name in modules:
    parts.append(name)
    if name == "blocks":
      parts.append(str(layer))
  parts.append("bias" if leaf == "bias" else "weight")
  return ".".join(parts)


def upstream_layout(params: Any) -> dict[str, Slot]:
  """Every upstream key of the tree `params` (arrays or ShapeDtypeStructs) and where it lives in our tree.

  Raises ValueError if two tensors would share a slot or a parameter has an unknown kind, so that the mapping is a
  bijection by construction.
  """
  layout: dict[str, Slot] = {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
    path = _path(key_path)
    if path[-1] not in ("kernel", "bias", "weight", "embedding"):
      raise ValueError(f"parameter {'/'.join(path)} has no upstream counterpart")
    shape = tuple(leaf.shape)
    scanned = any(name in _SCANNED for name in path[:-1])
    layers = range(shape[0]) if scanned else [None]
    shape = shape[1:] if scanned else shape
    transpose = path[-1] == "kernel"
    if transpose:
      shape = shape[:-2] + (shape[-1], shape[-2])
    for layer in layers:
      key = _upstream_key(path, layer)
      if key in layout:
        raise ValueError(f"upstream key {key} would hold both {'/'.join(layout[key].path)} and {'/'.join(path)}")
      layout[key] = Slot(path, layer, transpose, shape)
  return layout


def to_upstream(params: Any, dtype: np.dtype | str = np.float32) -> dict[str, Any]:
  """Our parameter tree -> {upstream key: tensor} in PyTorch layout, cast to `dtype`.

  Works on numpy or JAX arrays, and under `jax.eval_shape`.
  """
  flat = {_path(key_path): leaf for key_path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  tensors = {}
  for key, slot in upstream_layout(params).items():
    value = flat[slot.path]
    value = value[slot.layer] if slot.layer is not None else value
    tensors[key] = (value.swapaxes(-1, -2) if slot.transpose else value).astype(dtype)
  return tensors


def open_safetensors(path: str) -> Any:
  """`safe_open(path)` for numpy, with a ValueError naming the file when it is missing or not safetensors, or not on
  this machine (safetensors maps the file into memory)."""
  if not is_local(path):
    raise ValueError(f"{path}: a safetensors file is read from a local path; copy it here first (gcloud storage cp, "
                     "hf download). For a pod, convert it once into gs:// (python -m echo_jax.convert "
                     "import FILE --config CONFIG --out gs://BUCKET/converted) and train every host with "
                     "--init_from=gs://BUCKET/converted")
  try:
    return safe_open(path, framework="np")
  except (OSError, SafetensorError) as error:
    raise ValueError(f"{path} is not a readable safetensors file: {error}") from error


def check_upstream_shapes(shapes: dict[str, tuple[int, ...]], layout: dict[str, Slot], source: str) -> None:
  """Raises ValueError naming the missing, unexpected and wrongly-shaped tensors of `source`."""
  problems = []
  missing = sorted(set(layout) - set(shapes))
  extra = sorted(set(shapes) - set(layout))
  if missing:
    problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
  if extra:
    problems.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
  for key in sorted(set(shapes) & set(layout)):
    if tuple(shapes[key]) != layout[key].shape:
      problems.append(f"tensor {key} has shape {tuple(shapes[key])}, the config expects {layout[key].shape}")
  if problems:
    raise ValueError(f"{source} does not match the config: " + "; ".join(problems[:10]))


def _check_blockwise(keys: Sequence[str], config: ml_collections.ConfigDict, source: str) -> None:
  blockwise_keys = [key for key in keys if is_blockwise_key(key)]
  if config.model.blockwise and not blockwise_keys:
    raise ValueError(f"{source} has no blockwise modules (latent_encoder, latent_norm, wk_latent, wv_latent) but "
                     "the config has model.blockwise=True: import it without --blockwise")
  if blockwise_keys and not config.model.blockwise:
    raise ValueError(
        f"{source} holds the blockwise modules ({len(blockwise_keys)} tensors such as {blockwise_keys[0]}) but the "
        "config has model.blockwise=False: pass --drop_blockwise to leave them out, or --blockwise to keep them "
        "(sets model.blockwise=True)")


def read_upstream(path: str, config: ml_collections.ConfigDict, *, drop_blockwise: bool = False) -> Any:
  """Our float32 parameter tree (numpy) from an upstream safetensors file, for `config`.

  Every tensor of the file and every parameter of the config is used exactly once; a missing, unexpected or
  wrongly-shaped tensor raises ValueError naming it. drop_blockwise: ignore the file's blockwise tensors (the
  config must then have model.blockwise=False).
  """
  if drop_blockwise and config.model.blockwise:
    raise ValueError("drop_blockwise needs a config with model.blockwise=False")
  abstract = abstract_params(config)
  layout = upstream_layout(abstract)
  with open_safetensors(path) as f:
    names = f.keys()  # safe_open is not iterable
    keys = [key for key in names if not (drop_blockwise and is_blockwise_key(key))]
    _check_blockwise(keys, config, path)
    slices = {key: f.get_slice(key) for key in keys}
    for key, view in slices.items():
      if view.get_dtype() not in _FLOAT_KINDS:
        raise ValueError(f"{path}: tensor {key} has dtype {view.get_dtype()}, expected a float type")
    check_upstream_shapes({key: tuple(view.get_shape()) for key, view in slices.items()}, layout, path)
    # Filled in place, one upstream tensor at a time, so that memory peaks at one copy of the parameters.
    params = jax.tree.map(lambda leaf: np.empty(leaf.shape, np.float32), abstract)
    leaves = {_path(key_path): leaf for key_path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    for key, slot in layout.items():
      value = f.get_tensor(key).astype(np.float32)
      value = value.swapaxes(-1, -2) if slot.transpose else value
      if slot.layer is None:
        leaves[slot.path][...] = value
      else:
        leaves[slot.path][slot.layer] = value
  return params


def check_pca_state(path: str, latent_dim: int) -> None:
  """Raises ValueError unless `path` is an upstream PCA state for `latent_dim`-dimensional latents."""
  with open_safetensors(path) as f:
    names = f.keys()  # safe_open is not iterable
    shapes = {key: tuple(f.get_slice(key).get_shape()) for key in names}
  missing = [key for key in PCA_KEYS if key not in shapes]
  if missing:
    raise ValueError(f"{path} is not a PCA state: missing {', '.join(missing)} (expected {', '.join(PCA_KEYS)})")
  components, mean = shapes["pca_components"], shapes["pca_mean"]
  if len(components) != 2 or components[0] != latent_dim:
    raise ValueError(f"{path}: pca_components has shape {components}, expected ({latent_dim}, codec_dim)")
  if mean[-1:] != components[1:]:
    raise ValueError(f"{path}: pca_mean has shape {mean}, expected ({components[1]},)")
  if int(np.prod(shapes["latent_scale"])) != 1:
    raise ValueError(f"{path}: latent_scale has shape {shapes['latent_scale']}, expected a scalar")


# What a training run keeps in its directory, and an import's output directory never holds.
RUN_FILES = ("checkpoints", "metrics.jsonl", "events.jsonl")


def import_upstream(path: str, config: ml_collections.ConfigDict, out: str, *, pca: str | None = None,
                    drop_blockwise: bool = False) -> Any:
  """Converts an upstream safetensors file into a parameters-only checkpoint `out`, local or on gs://
  (`checkpoint.load_params` reads it), and copies the PCA state to out/pca_state.safetensors. Returns the float32
  parameters."""
  run_files = [name for name in RUN_FILES if storage.exists(storage.join(out, name))]
  if run_files:
    raise ValueError(f"{out} is a run directory (it holds {', '.join(run_files)}): its config.json would be "
                     "replaced; give a new directory")
  if pca is not None:
    check_pca_state(pca, config.model.latent_dim)
  params = read_upstream(path, config, drop_blockwise=drop_blockwise)
  if pca is not None:  # before the parameters, whose config.json, written last, marks the directory complete
    with open(pca, "rb") as f:
      storage.write_bytes(storage.join(out, PCA_FILE), f.read())
  save_params(params, config, out)
  return params


def export_upstream(checkpoint: str, out: str, dtype: str = "float32") -> ml_collections.ConfigDict:
  """Writes the parameters of `checkpoint` (anything `load_params` reads) as an upstream safetensors file."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
  storage.check_writable(out)  # before the export's work, not after it
  config, params = load_params(checkpoint)
  tensors = to_upstream(jax.tree.map(np.asarray, params), DTYPES[dtype])
  with storage.whole_file(out) as partial:  # a half-written file of the model's size must not stay behind
    save_file({key: np.ascontiguousarray(value) for key, value in tensors.items()}, partial,
              metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)  # safetensors creates its file readable by its owner alone, unlike any other
  return config


def load_init_params(path: str, config: ml_collections.ConfigDict) -> Any:
  """float32 numpy parameters to start training `config` from (`Trainer(init_params=...)`, `--init_from`).

  `path` is anything `checkpoint.load_params` reads (e.g. an `import` output directory), or an upstream
  .safetensors file, converted on the fly (its blockwise tensors are dropped unless the config is blockwise).
  Raises ValueError naming the first parameter whose presence, shape or dtype differs from what `config` expects.
  """
  expected = abstract_params(config)
  if path.endswith(".safetensors"):
    params = read_upstream(path, config, drop_blockwise=not config.model.blockwise)
  else:
    # A pickle file holds no config: it is read with this one's shapes. A directory is read with its own config.json,
    # so that a mismatch is reported below, parameter by parameter.
    _, params = load_params(path, config if storage.orbax_path(path).is_file() else None)
  differences = checkpoint.state_differences(params, expected, dtypes=True)
  if differences:
    hint = " (is model.blockwise the same as when it was saved?)" if any("the checkpoint but" in d or "missing" in d
                                                                        for d in differences) else ""
    raise ValueError(f"init_from {path}: {'; '.join(differences)}{hint}")
  # Host arrays: the trainer places them with its own shardings (and donates those copies, not these).
  found = {_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  return jax.tree.unflatten(jax.tree.structure(expected),
                            [np.asarray(jax.device_get(found[_path(k)])) for k, _ in
                             jax.tree_util.tree_leaves_with_path(expected)])


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  to_ours = commands.add_parser("import", help="upstream safetensors -> parameters-only checkpoint directory")
  to_ours.add_argument("weights", help="upstream pytorch_model.safetensors")
  to_ours.add_argument("--config", required=True, help="config file of the same shape (configs/echo_base_fish.py)")
  to_ours.add_argument("--out", required=True, help="output directory (config.json, params/, pca_state.safetensors)")
  to_ours.add_argument("--pca", help="upstream pca_state.safetensors, copied beside the parameters")
  blockwise = to_ours.add_mutually_exclusive_group()
  blockwise.add_argument("--drop_blockwise", action="store_true",
                         help="leave out latent_encoder, latent_norm, wk_latent, wv_latent "
                              "(sets model.blockwise=False)")
  blockwise.add_argument("--blockwise", action="store_true", help="keep them (sets model.blockwise=True)")
  to_ours.add_argument("--dtype", choices=sorted(DTYPES),
                       help="activation dtype recorded in the output config (model.dtype); parameters stay float32")
  to_upstream_parser = commands.add_parser("export", help="checkpoint -> upstream safetensors")
  to_upstream_parser.add_argument("checkpoint", help="run dir, step dir, parameters dir or pickle (load_params)")
  to_upstream_parser.add_argument("--out", required=True, help="output .safetensors file")
  to_upstream_parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="tensor dtype")
  args = parser.parse_args(argv)

  if args.command == "import":
    config = load_config_file(args.config)
    if args.drop_blockwise or args.blockwise:
      config.model.blockwise = bool(args.blockwise)
    if args.dtype:
      config.model.dtype = args.dtype
    params = import_upstream(args.weights, config, args.out, pca=args.pca, drop_blockwise=args.drop_blockwise)
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    print(f"wrote {args.out}: {count / 1e6:.1f}M parameters (float32), model.blockwise={config.model.blockwise}"
          + (f", PCA state {PCA_FILE}" if args.pca else ""))
  else:
    config = export_upstream(args.checkpoint, args.out, args.dtype)
    print(f"wrote {args.out}: {args.dtype}, model.blockwise={config.model.blockwise}")


if __name__ == "__main__":
  try:
    main()
  except (ValueError, OSError) as error:  # a bad file, path or flag: the message says what; a traceback buries it
    sys.exit(f"error: {error}")
