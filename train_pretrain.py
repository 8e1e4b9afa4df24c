"""Train Echo: `python train_pretrain.py --config=configs/demo.py --config.train.steps=100 --workdir=runs/x`.

configs/demo.py trains on data/demo (`make demo-data` builds it); other configs name their shards with
--config.data.train_shards (a glob, gs://BUCKET/train-*.tar or hf://datasets/ORG/NAME/train-*.tar).

Resumes from the newest complete checkpoint in --workdir. On a pod, run the same command on every host
(launch.sh does); SIGTERM saves a checkpoint on all hosts at the same step and exits 0. A local multi-host
simulation names the runtime with --coordinator_address/--num_processes/--process_id (or ECHO_COORDINATOR,
ECHO_NUM_PROCESSES, ECHO_PROCESS_ID; `launch.sh --local N` sets them).
"""

import signal
import sys
import threading

# Set by a SIGTERM that comes during the imports below (seconds on a pod): by default it would end the launch with
# 143, which launch.sh takes for a failure. The trainer's handler takes the signal over (`entry.join_hosts`) and
# stops the run at this event like at any other SIGTERM: a checkpoint after the first step, exit 0.
_STOP = threading.Event()
signal.signal(signal.SIGTERM, lambda signum, frame: _STOP.set())

from absl import app, flags  # noqa: E402 — after the handler: see _STOP
from ml_collections import config_flags  # noqa: E402

from echo_jax.errors import UserError  # noqa: E402
from echo_jax.runtime import print_error  # noqa: E402
from echo_jax.train.entry import train_main  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://).")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Start from these weights with a fresh optimizer: a converted directory, an upstream "
    ".safetensors file or any checkpoint (ignored when --workdir already has a checkpoint to resume).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a simulated multi-host run (TPU pods detect it).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a simulated multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a simulated multi-host run.")
_FORCE = flags.DEFINE_bool(
    "force", False, "Train even if the compiled step needs more than 90% of the accelerator memory (risks OOM or "
    "silent HBM thrashing).")
flags.mark_flags_as_required(["config", "workdir"])
# Given but empty (an unset shell variable, `--workdir=$RUN`): the run would go to the current directory, or start
# from random weights instead of fine-tuning, without a word.
flags.register_validator("workdir", lambda value: value is None or bool(value.strip()),
                         "--workdir is empty (an unset shell variable?): give the run directory")
flags.register_validator("init_from", lambda value: value is None or bool(value.strip()),
                         "--init_from is empty (an unset shell variable?): give the weights, or leave the flag out")


def main(argv):
  del argv
  try:
    train_main(_CONFIG.value, _WORKDIR.value, init_from=_INIT_FROM.value, coordinator_address=_COORDINATOR.value,
               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value, force=_FORCE.value, stop=_STOP)
  except UserError as error:  # its message says what to do; a traceback would bury it
    print_error(error)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
