"""The grammar of `hf://` URLs, read by the shard listing (`shards`: revisions resolved to commits) and by the shard
cache (`cache`: files at a commit never change)."""

import re

# A Hub commit as huggingface_hub writes it: a listing at one is pinned already.
HUB_COMMIT = re.compile(r"[0-9a-f]{40}")
# An hf:// URL's repository (with its type's prefix: datasets/ORG/NAME) and the revision after its "@", a branch, tag
# or commit, or one of the Hub's refs/pr/N and refs/convert/NAME, which keep their slashes (as in huggingface_hub).
HF_REVISION = re.compile(r"^(hf://(?:(?:datasets|spaces)/)?[^/@]+/[^/@]+)@(refs/pr/\d+|refs/convert/\w+|[^/]+)")


def at_commit(url: str) -> bool:
  """Whether `url` names its repository at a commit (hf://datasets/ORG/NAME@SHA/PATH, as `shards.list_shards` names
  every hf:// shard), whose files never change."""
  match = HF_REVISION.match(url)
  return match is not None and HUB_COMMIT.fullmatch(match.group(2)) is not None
