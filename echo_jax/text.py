"""Text handling for Echo: prompt normalisation, the byte tokenizer and chunking of long text (DESIGN §3, §8).

`normalize_text` follows the upstream Echo-TTS inference code (`tokenizer_encode(normalize=True)`): "…" becomes
"...", curly quotes become straight ones, newlines become spaces, ":" and ";" become "," and "—" becomes ", ", and
"[S1] " is prefixed unless the text starts with "[" or "(" or already names a speaker ("S1"/"S2"). Upstream replaces
"”" twice where it evidently meant "“" and "”"; here both become '"'. Runs of whitespace are also collapsed to one
space and the ends stripped, which upstream does only when chunking; the demo corpus and inference both use this
function, so training text matches inference text.

Long text is split into chunks first and each chunk is normalised afterwards (as upstream does), so every chunk gets
its own speaker tag.
"""

from __future__ import annotations

import re

import numpy as np

MAX_TEXT_LEN = 768
BOS_ID = 0

_REPLACEMENTS = (
    ("…", "..."),
    ("‘", "'"),
    ("’", "'"),
    ("“", '"'),
    ("”", '"'),
    ("\n", " "),
    (":", ","),
    (";", ","),
    ("—", ", "),
)
_WHITESPACE = re.compile(r"\s+")
_SENTENCE_END = frozenset(".!?")
_CLAUSE_END = frozenset(",;:")
_CLOSERS = frozenset("\"')]}”’")


def normalize_text(text: str) -> str:
  """The Echo prompt normalisation (see the module docstring); returns the text the model is fed."""
  if not isinstance(text, str):
    raise TypeError(f"text must be str, got {type(text).__name__}")
  for old, new in _REPLACEMENTS:
    text = text.replace(old, new)
  text = _WHITESPACE.sub(" ", text).strip()
  if not text.startswith(("[", "(")) and "S1" not in text and "S2" not in text:
    text = "[S1] " + text
  return text


def text_to_bytes(text: str) -> list[int]:
  """The token ids of `text` as given (no normalisation): BOS then its UTF-8 bytes."""
  return [BOS_ID, *text.encode("utf-8")]


def text_bytes_fit(text: str, max_len: int = MAX_TEXT_LEN) -> bool:
  """Whether `text` (already normalised) with its BOS fits in `max_len` tokens without truncation."""
  return len(text.encode("utf-8")) + 1 <= max_len


def encode_text(text: str, max_len: int = MAX_TEXT_LEN) -> tuple[np.ndarray, np.ndarray]:
  """Text (already normalised) -> (ids int32 [max_len], mask bool [max_len]): BOS + UTF-8 bytes, cut or zero-padded.

  Truncation may cut a multi-byte character; the model sees bytes, so that is harmless, and `text_bytes_fit` tells
  a caller beforehand when it would happen.
  """
  if max_len < 1:
    raise ValueError(f"max_len must be at least 1 (room for BOS), got {max_len}")
  tokens = text_to_bytes(text)[:max_len]
  ids = np.zeros((max_len,), np.int32)
  ids[: len(tokens)] = tokens
  mask = np.zeros((max_len,), bool)
  mask[: len(tokens)] = True
  return ids, mask


def _last_boundary(window: str) -> int | None:
  """Where to cut `window` (an index of a space), preferring sentence ends, then clause ends, then any space."""
  sentence = clause = space = None
  for i in range(1, len(window)):
    if not window[i].isspace():
      continue
    space = i
    before = window[i - 1]
    if before in _CLOSERS and i >= 2:
      before = window[i - 2]
    if before in _SENTENCE_END:
      sentence = i
    elif before in _CLAUSE_END:
      clause = i
  return sentence or clause or space


def split_text(text: str, max_chars: int = 300) -> list[str]:
  """Splits `text` into chunks of at most `max_chars` characters, for generating long text chunk by chunk.

  Whitespace is collapsed first. Each chunk ends at the last sentence end (".", "!", "?", optionally followed by a
  closing quote or bracket) that fits, else the last clause end (",", ";", ":"), else the last space; a word longer
  than `max_chars` is cut hard. No chunk is empty, and joining the chunks with spaces gives back the collapsed text,
  except where a word had to be cut.
  """
  if max_chars <= 0:
    raise ValueError(f"max_chars must be positive, got {max_chars}")
  remaining = _WHITESPACE.sub(" ", text).strip()
  chunks = []
  while len(remaining) > max_chars:
    # The window includes the character just past the limit: a space there is a boundary that fits.
    cut = _last_boundary(remaining[: max_chars + 1]) or max_chars
    chunks.append(remaining[:cut].rstrip())
    remaining = remaining[cut:].lstrip()
  if remaining:
    chunks.append(remaining)
  return chunks
