"""Train Echo: `python train_pretrain.py --config=configs/tiny.py --config.train.steps=100 --workdir=runs/x`.

Resumes from the newest complete checkpoint in --workdir. On a pod, run the same command on every host
(launch.sh does); SIGTERM saves a checkpoint on all hosts at the same step and exits 0.
"""

from absl import app, flags
from ml_collections import config_flags

from echo_jax.train.entry import train_main

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Start from these weights with a fresh optimizer: a converted directory, an upstream "
    ".safetensors file or any checkpoint (ignored when --workdir already has a checkpoint to resume).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  train_main(_CONFIG.value, _WORKDIR.value, init_from=_INIT_FROM.value)


if __name__ == "__main__":
  app.run(main)
