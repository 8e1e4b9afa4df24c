"""`make demo`: train the demo config on the eSpeak corpus with the live dashboard, then speak from the checkpoint.

Run after `python -m echo_jax.data.demo --out data/demo` (the Makefile does both). Re-running resumes or, when the
run is complete, only re-synthesizes.
"""

from __future__ import annotations

import json
import os
import socket
import threading

from echo_jax import dashboard
from echo_jax.codecs import audio as audio_lib
from echo_jax.config import load_config_file
from echo_jax.synthesis import Synthesizer
from echo_jax.train.entry import train_main
from echo_jax.train.samples import examples_from_shards

WORKDIR = "runs/demo"
OUTPUT = "demo.wav"
TEXT = "Hello! This voice was learned on your own computer, in a few minutes."


def free_port(preferred: int = 8080) -> int:
  """`preferred` when it is free on 127.0.0.1, else any free port."""
  for port in (preferred, 0):
    with socket.socket() as probe:
      try:
        probe.bind(("127.0.0.1", port))
        return probe.getsockname()[1]
      except OSError:
        continue
  raise OSError("no free port on 127.0.0.1 for the dashboard")


def eval_losses(workdir: str) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]


def main() -> None:
  config = load_config_file("configs/demo.py")
  os.makedirs(WORKDIR, exist_ok=True)  # the dashboard serves the run directory from the first step on
  port = free_port()
  server = dashboard.make_server([WORKDIR], port=port)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  print(f"[demo] dashboard: http://127.0.0.1:{port}  (live while training; later: python monitor.py {WORKDIR})")
  print(f"[demo] training configs/demo.py for {config.train.steps} steps into {WORKDIR}/ ...")
  train_main(config, WORKDIR)
  server.shutdown()

  losses = eval_losses(WORKDIR)
  (first_step, first), (last_step, last) = losses[0], losses[-1]
  print(f"[demo] held-out eval loss: {first:.4f} at step {first_step} -> {last:.4f} at step {last_step} "
        f"({100 * (1 - last / first):.0f}% lower)")

  reference = examples_from_shards(config.data.eval_shards, 1, config.model.latent_dim)[0]
  synthesizer = Synthesizer.from_checkpoint(WORKDIR)
  result = synthesizer.synthesize(TEXT, reference.speaker, seed=42)  # in the training window (default_duration)
  audio_lib.write_wav(OUTPUT, result.audio, result.sample_rate)
  print(f"[demo] wrote {OUTPUT}: {result.seconds:.2f} s of speech for {TEXT!r} "
        f"(voice of a held-out reference; real-time factor {result.real_time_factor:.2f})")
  print(f"[demo] open: {OUTPUT}, {WORKDIR}/samples/ (speech during training), {WORKDIR}/metrics.jsonl;"
        f" dashboard again: python monitor.py {WORKDIR}")


if __name__ == "__main__":
  main()
