"""Text handling for Echo: prompt normalisation, the byte tokenizer and chunking of long text (DESIGN §3, §8).

`normalize_text` follows the upstream Echo-TTS inference code (`tokenizer_encode(normalize=True)`): "…" becomes
"...", curly quotes become straight ones, newlines become spaces, ":" and ";" become "," and "—" becomes ", ", and
"[S1] " is prefixed unless the text starts with "[" or "(" or already names a speaker ("S1"/"S2"). Upstream replaces
"”" twice where it evidently meant "“" and "”"; here both become '"'. Runs of whitespace are also collapsed to one
space and the ends stripped, which upstream does only when chunking; the demo corpus and inference both use this
function, so training text matches inference text.

Long text is split into chunks and each chunk is normalised on its own (as upstream does), so every chunk gets a
speaker tag; unlike upstream, a chunk that does not begin with one continues the speaker of the chunk before it (whose
last tag it is given) instead of being given "[S1]" (`chunk_text`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

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
_SPEAKER_TAG = re.compile(r"\[S\d+\]")


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


def _longest_fitting(text: str, max_chars: int, fits: Callable[[str], bool]) -> int:
  """The longest prefix length n <= max_chars of `text` with fits(text[:n]), by bisection (a normalised prefix only
  grows with the prefix, but for the speaker tag, which a prefix naming a speaker does without: see `chunk_text`)."""
  low, high = 0, min(len(text), max_chars)
  while low < high:
    middle = (low + high + 1) // 2
    if fits(text[:middle]):
      low = middle
    else:
      high = middle - 1
  return low


def iter_chunks(text: str, max_chars: int = 300, fits: Callable[[str], bool] | None = None) -> Iterator[str]:
  """Splits `text` into chunks of at most `max_chars` characters and, given `fits`, each one that `fits` accepts, for
  generating long text chunk by chunk. The chunks are cut one at a time, as they are asked for: `fits` may change
  with the chunks before (`chunk_text`).

  Whitespace is collapsed first. Each chunk ends at the last sentence end (".", "!", "?", optionally followed by a
  closing quote or bracket) that fits, else the last clause end (",", ";", ":"), else the last space; a word longer
  than a chunk is cut hard. No chunk is empty, and joining the chunks with spaces gives back the collapsed text,
  except where a word had to be cut. ValueError when `fits` accepts not even one character.
  """
  if max_chars <= 0:
    raise ValueError(f"max_chars must be positive, got {max_chars}")
  fits = fits or (lambda chunk: True)
  remaining = _WHITESPACE.sub(" ", text).strip()
  while remaining:
    if len(remaining) <= max_chars and fits(remaining):
      yield remaining
      return
    limit = _longest_fitting(remaining, max_chars, fits)
    if limit == 0:
      raise ValueError(f"not even one character of {remaining[:40]!r} fits a chunk")
    # The window includes the character just past the limit: a space there is a boundary that fits.
    cut = _last_boundary(remaining[: limit + 1]) or limit
    if not fits(remaining[:cut].rstrip()):  # shorter than one that fits, yet longer normalised: cut at the limit
      cut = limit
    yield remaining[:cut].rstrip()
    remaining = remaining[cut:].lstrip()


def chunk_text(text: str, max_len: int = MAX_TEXT_LEN, max_chars: int = 300) -> list[str]:
  """Long text -> normalised chunks for the model: each at most `max_chars` characters before normalisation and, once
  normalised, at most `max_len` tokens with its BOS (UTF-8 bytes: a character of Chinese text takes 3, and
  normalisation lengthens "…" and "—"), split as `iter_chunks` does.

  A chunk that does not begin with a speaker tag (or "(") continues the speaker of the chunk before it: it is given
  that chunk's last tag ("[S2]"), so that a turn running over a chunk boundary keeps its speaker; the first chunk is
  normalised as `normalize_text` does alone. ValueError when `max_len` leaves no room for a character."""
  chunks: list[str] = []

  def normalized(piece: str) -> str:
    tags = _SPEAKER_TAG.findall(chunks[-1]) if chunks else []
    if tags and not piece.startswith(("[", "(")):
      piece = f"{tags[-1]} {piece}"
    return normalize_text(piece)

  def fits(piece: str) -> bool:
    return text_bytes_fit(normalized(piece), max_len)

  # Cut lazily: whether the next chunk fits depends on the tag that the one before leaves in force.
  for piece in iter_chunks(text, max_chars, fits):
    chunks.append(normalized(piece))
  return chunks
