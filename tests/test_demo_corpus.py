"""The demo corpus builder: valid, speaker-consistent, deterministic shards, and reruns that skip done work."""

import json
import os
import tarfile

import numpy as np
import pytest

from echo_jax.codecs.mel import MelCodec
from echo_jax.data import demo
from echo_jax.data.shards import iter_shard

LIMIT, SPEAKERS, SHARD_SIZE = 8, 2, 5


def read_dir(path):
  return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def read_samples(path, shard_names):
  """All samples of the shards, failing on any sample the reader skips."""
  skipped = []
  samples = []
  for name in shard_names:
    shard = str(path / name)
    with tarfile.open(shard) as tar:
      num_members = len(tar.getmembers())
    shard_samples = list(iter_shard(shard, lambda *args: skipped.append(args), latent_dim=128))
    assert num_members == 3 * len(shard_samples)
    samples.extend(shard_samples)
  assert skipped == []
  return samples


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  demo.main(["--out", str(out), "--limit", str(LIMIT), "--speakers", str(SPEAKERS), "--shard_size", str(SHARD_SIZE)])
  with open(out / "manifest.json") as stream:
    return out, json.load(stream)


def test_manifest_counts_and_files(corpus):
  out, manifest = corpus
  assert manifest["counts"] == {"train": 14, "eval": 2, "dropped": 0, "train_sentences": 7, "eval_sentences": 1,
                                "speakers": 2}
  assert manifest["train_shards"] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
  assert manifest["eval_shards"] == ["eval-00000.tar"]
  assert manifest["speakers"] == [speaker.name for speaker in demo.SPEAKERS[:SPEAKERS]]
  assert manifest["inputs"]["codec"] == MelCodec().params()
  assert sorted(os.listdir(out)) == sorted([*manifest["files"], "manifest.json"])
  np.testing.assert_array_equal(np.load(out / "pad_latent.npy"), MelCodec().pad_latent)


def test_every_sample_valid_with_same_speaker_reference(corpus):
  out, manifest = corpus
  train = read_samples(out, manifest["train_shards"])
  held_out = read_samples(out, manifest["eval_shards"])
  assert len(train) == 14 and len(held_out) == 2
  by_key = {sample.key: sample for sample in train + held_out}
  assert len(by_key) == 16
  train_keys = {sample.key for sample in train}
  for sample in by_key.values():
    meta = sample.meta
    assert sample.latent.dtype == np.float16 and sample.latent.shape[1] == 128
    assert 0 < sample.latent.shape[0] <= demo.MAX_FRAMES
    assert abs(meta["duration"] * 25 - sample.latent.shape[0]) < 1
    assert meta["text"].startswith("[S1] ") and len(meta["text"]) > 10
    assert sample.key.startswith(meta["speaker"] + "_")
    ref_key = meta["ref_key"]
    assert ref_key != sample.key and ref_key in train_keys
    assert by_key[ref_key].meta["speaker"] == meta["speaker"]
    np.testing.assert_array_equal(sample.ref, by_key[ref_key].latent)
    assert sample.ref.shape != sample.latent.shape or not np.array_equal(sample.ref, sample.latent)
  train_texts = {sample.text for sample in train}
  assert all(sample.text not in train_texts for sample in held_out)
  # Both speakers speak the held-out sentence; their audio differs.
  first, second = held_out
  assert first.text == second.text and first.meta["speaker"] != second.meta["speaker"]
  assert not np.array_equal(first.latent[:10], second.latent[:10])


def test_two_builds_are_byte_identical(corpus, tmp_path):
  out, _ = corpus
  demo.build(str(tmp_path), limit=LIMIT, num_speakers=SPEAKERS, shard_size=SHARD_SIZE, progress=False)
  assert read_dir(tmp_path) == read_dir(out)


def test_rerun_skips_and_changes_rebuild(corpus, tmp_path, capsys):
  out, _ = corpus
  args = dict(limit=LIMIT, num_speakers=SPEAKERS, shard_size=SHARD_SIZE, progress=False)
  demo.build(str(tmp_path), **args)
  before = {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)}
  capsys.readouterr()
  demo.build(str(tmp_path), **args)
  assert "up to date" in capsys.readouterr().out
  assert {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)} == before

  # A damaged shard is noticed and rebuilt.
  (tmp_path / "train-00001.tar").write_bytes(b"truncated")
  demo.build(str(tmp_path), **args)
  assert "up to date" not in capsys.readouterr().out
  assert read_dir(tmp_path) == read_dir(out)

  # Other inputs give another build, and shards the new build does not list are removed.
  demo.build(str(tmp_path), **{**args, "shard_size": 20})
  with open(tmp_path / "manifest.json") as stream:
    manifest = json.load(stream)
  assert manifest["train_shards"] == ["train-00000.tar"]
  assert sorted(os.listdir(tmp_path)) == ["eval-00000.tar", "manifest.json", "pad_latent.npy", "train-00000.tar"]


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="at least 3 sentences"):
    demo.build(str(tmp_path), limit=2, progress=False)
  with pytest.raises(ValueError, match="num_speakers"):
    demo.build(str(tmp_path), num_speakers=len(demo.SPEAKERS) + 1, progress=False)
  with pytest.raises(ValueError, match="shard_size"):
    demo.build(str(tmp_path), limit=4, shard_size=0, progress=False)
  with pytest.raises(ValueError, match="no voice"):
    demo.ESpeak.get().synthesize("hi", "no-such-voice")
