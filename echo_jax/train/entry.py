"""What `train_pretrain.py` does after parsing flags: runtime set-up, hooks, then `Trainer.run()`."""

from __future__ import annotations

import functools
import signal
import threading

import jax
import ml_collections
from absl import logging

from echo_jax import codecs, convert, runtime
from echo_jax.errors import ConfigError
from echo_jax.sampling import SamplerConfig
from echo_jax.train.loop import Hook, Trainer, install_sigint_handler, install_sigterm_handler
from echo_jax.train.samples import HeldOutExamples, examples_from_shards, make_sample_hook


def sample_hooks(config: ml_collections.ConfigDict) -> tuple[tuple[int, Hook], ...]:
  """The speech-samples hook, when the config asks for samples and has a codec and held-out shards.

  Process 0, which alone generates samples, starts reading their held-out examples here, in the background: the
  launch's set-up (listing, restore, compile) goes on meanwhile, and its first sample step waits for what is left (a
  failed read is a sample_error there). Read here in the launch's path on every host, a listing or download that
  failed would end that host's launch alone (the others waiting for it in a collective), one that hung would hang it
  before the set-up watchdog (train.setup_timeout) is armed, and a pod would make 8 times the requests (the Hub
  rate-limits them)."""
  if config.samples.every <= 0:
    return ()
  if config.codec == "none" or not config.data.eval_shards:
    raise ConfigError("samples.every > 0 needs a codec (config.codec) and held-out shards (config.data.eval_shards); "
                      "set --config.samples.every=0 to train without samples")
  codec = codecs.get_codec(config.codec, config.codec_weights or None)
  if codec.latent_dim != config.model.latent_dim:  # each sample step failed on it, in events.jsonl alone
    raise ConfigError(f"config.codec={config.codec!r} makes {codec.latent_dim}-d latents but the model's are "
                      f"{config.model.latent_dim}-d (config.model.latent_dim): samples could never be spoken; name the "
                      "codec the shards were encoded with, or set --config.samples.every=0")
  examples = HeldOutExamples(functools.partial(
      examples_from_shards, config.data.eval_shards, config.samples.count, config.model.latent_dim,
      stall_timeout=config.data.stall_timeout, retries=config.data.download_retries))
  if jax.process_index() == 0:
    examples.start()
  return ((config.samples.every, make_sample_hook(codec, examples, SamplerConfig(steps=config.samples.steps))),)


def join_hosts(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, stop: threading.Event | None = None) -> threading.Event:
  """Installs the SIGTERM handler, then joins the multi-host runtime (`runtime.initialize`); returns the event the
  Trainer stops at: `stop` when given (a SIGTERM during train_pretrain.py's imports sets it), else a new one. In this
  order: a SIGTERM while the hosts join (which waits for all of them) must stop the run like any other, with a
  checkpoint and exit 0, not end it with 143, which launch.sh takes for a failure; once joined, SIGTERM is JAX's
  preemption notice (see `install_sigterm_handler`). A run of one process that has not joined stops at its first
  Ctrl-C with a checkpoint too (`install_sigint_handler`)."""
  stop = stop or threading.Event()
  install_sigterm_handler(stop)
  runtime.initialize(coordinator_address, num_processes, process_id)
  if not jax.distributed.is_initialized():
    install_sigint_handler(stop)
  return stop


def train_main(config: ml_collections.ConfigDict, workdir: str, *, init_from: str | None = None,
               coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, force: bool = False, stop: threading.Event | None = None) -> None:
  """Joins the multi-host runtime (`join_hosts`, given `stop`), then trains `config` into `workdir`."""
  stop = join_hosts(coordinator_address, num_processes, process_id, stop)
  with runtime.exit_at_once_on_error():
    runtime.enable_compilation_cache(config.compile_cache_dir)
    # launch.sh finds the worker that hosts process 0 (the dashboard's run log and the events) by this line.
    print(f"process_index={jax.process_index()} process_count={jax.process_count()} "
          f"local_devices={jax.local_device_count()} devices={jax.device_count()}", flush=True)
    # Orbax narrates every save at INFO; the run directory's events.jsonl is the record users read.
    logging.set_verbosity(logging.WARNING)
    init_params = functools.partial(convert.load_init_params, init_from, config) if init_from else None
    try:
      Trainer(config, workdir, hooks=sample_hooks(config), init_params=init_params, force=force,
              stop_requested=stop).run()
    finally:
      signal.signal(signal.SIGINT, signal.default_int_handler)  # what follows a run (the demo's speech) is Python's
