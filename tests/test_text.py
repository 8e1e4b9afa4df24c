"""Echo text normalisation, byte tokenizer and chunking."""

import numpy as np
import pytest

from echo_jax.text import MAX_TEXT_LEN, chunk_text, encode_text, iter_chunks, normalize_text, text_bytes_fit


def split_text(text, max_chars=300):
  return list(iter_chunks(text, max_chars))


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Welcome to our presentation today.", "[S1] Welcome to our presentation today."),
        ("Hello! How are you doing?", "[S1] Hello! How are you doing?"),
        ("[S1] The weather is beautiful, isn't it?", "[S1] The weather is beautiful, isn't it?"),
        ("The weather is beautiful, isn’t it?", "[S1] The weather is beautiful, isn't it?"),
        ("He said “hi” and ‘bye’.", "[S1] He said \"hi\" and 'bye'."),
        ("Wait… what?", "[S1] Wait... what?"),
        ("Note: first; second—third", "[S1] Note, first, second, third"),
        ("line one\nline two\n\n  three", "[S1] line one line two three"),
        ("  padded   text  ", "[S1] padded text"),
        ("(laughs) okay then", "(laughs) okay then"),
        ("[S2] Hi there. [S1] Hello.", "[S2] Hi there. [S1] Hello."),
        ("Speaker S1 is already named", "Speaker S1 is already named"),
        ("Grüße aus Köln, 東京 too", "[S1] Grüße aus Köln, 東京 too"),
    ],
)
def test_normalize_text(raw, expected):
  assert normalize_text(raw) == expected


def test_normalize_text_is_idempotent():
  text = "Note: one… two—three\n“four”"
  assert normalize_text(normalize_text(text)) == normalize_text(text)


def test_normalize_text_rejects_non_strings():
  with pytest.raises(TypeError, match="str"):
    normalize_text(b"bytes")


def test_encode_text_bytes_bos_and_padding():
  ids, mask = encode_text("[S1] Hé", max_len=12)
  expected = [0, *"[S1] Hé".encode()]  # é is two bytes
  assert ids.dtype == np.int32 and mask.dtype == bool
  assert ids.shape == mask.shape == (12,)
  assert ids[: len(expected)].tolist() == expected
  assert ids[len(expected):].tolist() == [0] * (12 - len(expected))
  assert mask.tolist() == [True] * len(expected) + [False] * (12 - len(expected))


def test_encode_text_truncates_over_768_bytes():
  text = "ü" * 500  # 1000 bytes
  assert not text_bytes_fit(text)
  ids, mask = encode_text(text)
  assert ids.shape == (MAX_TEXT_LEN,) and mask.all()
  assert ids[0] == 0 and bytes(ids[1:].astype(np.uint8)) == text.encode("utf-8")[: MAX_TEXT_LEN - 1]


def test_text_bytes_fit_boundary():
  assert text_bytes_fit("a" * (MAX_TEXT_LEN - 1))  # plus BOS = exactly 768
  assert not text_bytes_fit("a" * MAX_TEXT_LEN)
  assert not text_bytes_fit("€" * 256)  # 768 bytes of text plus BOS


def test_encode_text_rejects_zero_length():
  with pytest.raises(ValueError, match="max_len"):
    encode_text("hi", max_len=0)


def _words(text):
  return text.split()


def test_split_text_prefers_sentence_boundaries():
  text = "First sentence here. Second one, with a clause. Third sentence is last."
  assert split_text(text, max_chars=50) == [
      "First sentence here. Second one, with a clause.",
      "Third sentence is last.",
  ]


def test_split_text_falls_back_to_clauses_then_words():
  text = "alpha beta gamma, delta epsilon zeta eta theta"
  assert split_text(text, max_chars=25) == ["alpha beta gamma,", "delta epsilon zeta eta", "theta"]


def test_split_text_sentence_end_inside_quotes():
  text = 'She said "stop." Then she left the room quickly.'
  assert split_text(text, max_chars=30)[0] == 'She said "stop."'


def test_split_text_hard_splits_long_words():
  word = "x" * 25
  chunks = split_text(f"a {word} b", max_chars=10)
  assert all(0 < len(chunk) <= 10 for chunk in chunks)
  assert "".join(chunks).replace(" ", "") == f"a{word}b"


def test_split_text_short_and_empty():
  assert split_text("  Just one.  ") == ["Just one."]
  assert split_text("   ") == []
  with pytest.raises(ValueError, match="max_chars"):
    split_text("text", max_chars=0)


def test_split_text_long_passage_recovers_words():
  rng = np.random.default_rng(0)
  vocab = ["the", "quick", "brown", "fox", "jumps,", "over", "lazy", "dogs.", "Why?", "wonderful!", "réalité", "東京"]
  text = " ".join(rng.choice(vocab, size=600))
  chunks = split_text(text, max_chars=300)
  assert len(chunks) > 3
  assert all(0 < len(chunk) <= 300 for chunk in chunks)
  assert _words(" ".join(chunks)) == _words(text)
  # Every chunk but the last ends at a sentence or clause boundary when one was available in its window.
  assert all(chunk[-1] in ".!?," for chunk in chunks[:-1])


def test_chunks_fit_the_model_in_bytes_not_characters():
  """A character of Chinese text is 3 UTF-8 bytes, and normalisation lengthens "…" to "...": chunks measured in
  characters were cut by up to 15% at the model's text length, silently (found by review)."""
  text = "今天天气很好，我们去公园散步吧。" * 40 + " Wait… what — really… " * 20
  chunks = chunk_text(text, max_len=MAX_TEXT_LEN)
  assert all(text_bytes_fit(chunk, MAX_TEXT_LEN) for chunk in chunks)
  assert max(len(chunk.encode()) for chunk in chunks) > MAX_TEXT_LEN - 40  # filled, not cut needlessly short
  spoken = "".join(chunk.removeprefix("[S1] ") for chunk in chunks).replace(" ", "")
  assert spoken == normalize_text(text).removeprefix("[S1] ").replace(" ", "")
  assert all(text_bytes_fit(chunk, 32) for chunk in chunk_text("東京 réalité… " * 30, max_len=32))


def test_a_turn_running_over_a_chunk_boundary_keeps_its_speaker():
  text = "[S1] How was the trip? [S2] " + "It was long, and the roads were wet. " * 12
  chunks = chunk_text(text, max_len=MAX_TEXT_LEN, max_chars=120)
  assert chunks[0].startswith("[S1] How was the trip? [S2] It was long")
  assert len(chunks) > 2 and all(chunk.startswith("[S2] It was long") for chunk in chunks[1:])
  # The first chunk without a tag gets "[S1]", as upstream; "(" opens a chunk of its own.
  assert chunk_text("Hello there.")[0] == "[S1] Hello there."
  assert chunk_text("(laughs) Hello.") == ["(laughs) Hello."]


def test_a_text_length_with_no_room_for_a_character_is_refused():
  with pytest.raises(ValueError, match="not even one character"):
    chunk_text("Hello there.", max_len=6)  # BOS and "[S1] " take 6 tokens
