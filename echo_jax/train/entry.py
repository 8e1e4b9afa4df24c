"""What `train_pretrain.py` does after parsing flags: runtime set-up, then `Trainer.run()`."""

from __future__ import annotations

import ml_collections
from absl import logging

from echo_jax.train.loop import Trainer, install_sigterm_handler


def train_main(config: ml_collections.ConfigDict, workdir: str) -> None:
  # Orbax narrates every save at INFO; the run directory's events.jsonl is the record users read.
  logging.set_verbosity(logging.WARNING)
  trainer = Trainer(config, workdir)
  install_sigterm_handler(trainer)
  trainer.run()
