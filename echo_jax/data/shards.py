"""The tar shard format (DESIGN §6): writing shards and the sample record.

A sample is three adjacent tar members sharing a key without dots: `{key}.npy` (target latent [T, D] float16),
`{key}.ref.npy` (speaker reference latent [Ts, D] float16) and `{key}.json` (metadata with at least "text").
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import webdataset as wds


@dataclasses.dataclass
class Sample:
  key: str
  latent: np.ndarray  # [T, D] float16
  ref: np.ndarray  # [Ts, D] float16
  meta: dict[str, Any]

  @property
  def text(self) -> str:
    return self.meta["text"]


def _npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


def write_shard(path: str, samples: Iterable[Sample]) -> int:
  """Writes `samples` to the tar shard `path` and returns how many were written.

  The shard appears under its name only when complete (written to a temporary name, then renamed), so a reader
  or a crashed writer never leaves a half-written shard that looks finished. The bytes depend only on the samples
  (fixed mtime and owner), so the same samples always give an identical shard.
  """
  count = 0
  partial = f"{path}.partial"
  with open(partial, "wb") as stream:
    writer = wds.TarWriter(stream, user="echo", group="echo", mtime=0.0, encoder=False)
    for sample in samples:
      if "." in sample.key or not sample.key:
        raise ValueError(f"sample key {sample.key!r} is empty or contains a dot; tar shard keys must not")
      if "text" not in sample.meta:
        raise ValueError(f"sample {sample.key!r} has no 'text' in its metadata")
      writer.write({
          "__key__": sample.key,
          "npy": _npy_bytes(np.asarray(sample.latent, np.float16)),
          "ref.npy": _npy_bytes(np.asarray(sample.ref, np.float16)),
          "json": json.dumps(sample.meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
      })
      count += 1
    writer.close()
  os.replace(partial, path)
  return count
