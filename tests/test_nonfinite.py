"""The non-finite guard: a run whose data turns to NaN skips updates, records events, stops after K in a row,
and its last checkpoint holds finite parameters."""

import json
import os
import time

import jax
import numpy as np
import pytest
from conftest import load_config, write_synthetic_shards

from echo_jax import checkpoint, dashboard
from echo_jax.train import loop


class TurnsToNaN:
  """The real pipeline, whose batches become NaN after the first 7 (data corruption that passed validation)."""

  def __init__(self, pipeline):
    self.pipeline = pipeline
    self.served = 0

  def __next__(self):
    batch = next(self.pipeline)
    self.served += 1
    if self.served > 7:
      batch = {**batch, "latent": np.full_like(batch["latent"], np.nan)}
    return batch

  def state(self):
    return self.pipeline.state()

  def close(self):
    self.pipeline.close()


class CorruptedTrainer(loop.Trainer):
  def _pipeline(self, *args, **kwargs):
    return TurnsToNaN(super()._pipeline(*args, **kwargs))


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
  config = load_config("tiny")
  config.data.train_shards = write_synthetic_shards(tmp_path / "shards")
  config.train.update(steps=50, ckpt_every=5, eval_every=0, max_nonfinite=3)
  workdir = tmp_path / "run"
  with pytest.raises(loop.NonFiniteError, match="3 consecutive steps"):
    CorruptedTrainer(config, str(workdir)).run()

  with open(workdir / "events.jsonl", encoding="utf-8") as f:
    events = [json.loads(line) for line in f]
  nonfinite = [e for e in events if e["event"] == "nonfinite"]
  assert [e["step"] for e in nonfinite] == [8, 9, 10]
  errors = [e for e in events if e["event"] == "error"]
  assert len(errors) == 1 and errors[0]["step"] == 10 and "checkpoints" in errors[0]["message"]
  # Step 10 was saved after three skipped updates: its parameters are still those of step 7, all finite.
  steps = checkpoint.Checkpointer(str(workdir / "checkpoints"), keep=3).all_steps()
  assert max(steps) == 10
  _, params = checkpoint.load_params(str(workdir))
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))
  _, params_5 = checkpoint.load_params(str(workdir / "checkpoints" / "5"))
  changed = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_5),
                                                         strict=True))
  assert changed  # steps 6 and 7 were real updates, so the guard did not freeze training early
  assert os.path.exists(workdir / "checkpoints" / "10")
  # The dashboard, reading the trainer's own lines, shows the loss as NaN from step 8, not step 7's finite loss, and
  # the stop's error from the process's own error file.
  run = dashboard.RunState(str(workdir), "run")
  run.refresh()
  status = run.status(time.time())
  assert status["latest"]["loss"] == "nan" and status["nonfinite"]["loss"] == 10, status["latest"]
  assert run.series(["loss"], 2000)["loss"]["nonfinite"]["step"].tolist() == [8, 9, 10]
  assert [e["message"][:39] for e in status["process_errors"]] == ["NonFiniteError: stopping: 3 consecutive"]
  assert status["process_errors"][0]["step"] == 10  # the step that stopped it (before: not known, null)
