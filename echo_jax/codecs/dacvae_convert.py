"""Converts the published DACVAE `weights.pth` into a safetensors file for `echo_jax.codecs.dacvae`.

    python -m echo_jax.codecs.dacvae_convert weights.pth --out dacvae.safetensors

Output layout: every key of the reference PyTorch state dict, float32, in PyTorch layout, except that each
weight-normalised conv's `<name>.weight_g` / `<name>.weight_v` pair is folded into one `<name>.weight`
(w = g * v / ||v||, the norm over every axis but 0, as torch's `weight_norm(dim=0)`; for ConvTranspose1d axis 0
is the input channel). `dacvae.param_shapes(config)` lists the keys and shapes; the architecture config is stored
as JSON in the safetensors metadata under `dacvae.CONFIG_METADATA_KEY`.

torch is imported only inside `convert_checkpoint`, to unpickle the .pth; everything else works on numpy dicts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from echo_jax.codecs.dacvae import CONFIG_METADATA_KEY, DacvaeConfig, check_shapes, state_dict_shapes

# torch.nn.utils.parametrizations.weight_norm names the same two tensors differently.
_PARAMETRIZATION_NAMES = {".parametrizations.weight.original0": ".weight_g",
                          ".parametrizations.weight.original1": ".weight_v"}


def _canonical_key(key: str) -> str:
  for new, old in _PARAMETRIZATION_NAMES.items():
    if key.endswith(new):
      return key[: -len(new)] + old
  return key


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
  """g * v / ||v||, the norm over all axes but 0 (torch `weight_norm(dim=0)`), computed in float64."""
  v64 = v.astype(np.float64)
  norm = np.sqrt(np.sum(v64 * v64, axis=tuple(range(1, v.ndim)), keepdims=True))
  return (g.astype(np.float64) * v64 / norm).astype(np.float32)


def convert_state_dict(state_dict: Mapping[str, Any], config: DacvaeConfig) -> dict[str, np.ndarray]:
  """Reference state dict (numpy-convertible arrays) -> folded float32 params; checks every key and shape."""
  arrays = {_canonical_key(k): np.asarray(v) for k, v in state_dict.items()}
  check_shapes(arrays, state_dict_shapes(config), "DACVAE state dict")
  params = {}
  for key, value in arrays.items():
    if key.endswith(".weight_g"):
      continue
    if key.endswith(".weight_v"):
      name = key[: -len(".weight_v")]
      params[f"{name}.weight"] = fold_weight_norm(arrays[f"{name}.weight_g"], value)
    else:
      params[key] = value.astype(np.float32)
  return params


def save_dacvae(params: Mapping[str, np.ndarray], config: DacvaeConfig, path: str | os.PathLike) -> None:
  """Writes folded params and the config to a safetensors file (atomically, via a temporary name)."""
  from safetensors.numpy import save_file

  path = os.fspath(path)
  tmp = f"{path}.tmp"
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}, tmp,
            metadata={CONFIG_METADATA_KEY: config.to_json()})
  os.replace(tmp, path)


def convert_checkpoint(pth_path: str | os.PathLike, out_path: str | os.PathLike) -> DacvaeConfig:
  """Reads the published .pth (a bare state dict, or {'state_dict', 'metadata': {'kwargs'}}) and writes
  safetensors. The config comes from the checkpoint's kwargs when present, else the published defaults."""
  import torch  # only here: unpickling the published checkpoint

  checkpoint = torch.load(os.fspath(pth_path), map_location="cpu", weights_only=True)
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{pth_path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
  state_dict = checkpoint.get("state_dict", checkpoint)
  kwargs = (checkpoint.get("metadata") or {}).get("kwargs") if "state_dict" in checkpoint else None
  config = DacvaeConfig.from_reference_kwargs(kwargs) if kwargs else DacvaeConfig()
  arrays = {}
  for key, value in state_dict.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{pth_path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    arrays[key] = value.detach().float().numpy()
  save_dacvae(convert_state_dict(arrays, config), config, out_path)
  return config


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("weights", help="the published DACVAE weights.pth")
  parser.add_argument("--out", required=True, help="output .safetensors path")
  args = parser.parse_args(argv)
  config = convert_checkpoint(args.weights, args.out)
  print(f"wrote {args.out}: {config}")


if __name__ == "__main__":
  main()
