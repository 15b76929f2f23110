"""Synthetic keyword text: an offline text-classification task whose evidence tokens are known.

Each sample is a padded sequence of word ids: filler words that carry no class
information and, at random positions, one to three keywords of its class
("great", "superb", ... for ``positive``; "awful", "boring", ... for
``negative``); ``neutral`` samples have filler words only. With a class
without keywords, neither keyword class can be told by the absence of the
other's keywords: a model must find the keywords of both. The keyword mask
marks the evidence tokens, so a test can check that attention and attributions
fall on them. Generated deterministically from a seed, in memory, in
milliseconds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["KEYWORDS", "TEXT_CLASSES", "VOCABULARY", "KeywordText", "make_keyword_text"]

TEXT_CLASSES = ("negative", "positive", "neutral")
KEYWORDS = (("awful", "boring", "dull", "terrible"), ("great", "superb", "lovely", "brilliant"))
"""The evidence words of the negative and positive classes (class k's keywords appear only in samples of class k;
neutral samples have none)."""
_FILLER = (
    "the", "a", "film", "movie", "plot", "actor", "scene", "was", "is", "and", "it", "this", "that", "very",
    "not", "quite", "story", "end", "music", "camera", "of", "to", "in", "with", "for", "on", "at", "my",
    "we", "they", "saw", "felt", "long", "short", "cast", "script", "night", "seat", "popcorn", "again",
)  # fmt: skip
VOCABULARY = ("<pad>", *_FILLER, *(word for words in KEYWORDS for word in words))
"""Token id -> word; id 0 is padding."""
PAD_ID = 0


class KeywordText(NamedTuple):
    """A keyword-text dataset held in memory.

    Attributes:
        ids: (N, T) int64 token ids, padded with :data:`PAD_ID` at the end.
        labels: (N,) int64 class indices (see :data:`TEXT_CLASSES`).
        keyword_mask: (N, T) bool, True at the keyword tokens (the evidence; none in neutral samples).
    """

    ids: Tensor
    labels: Tensor
    keyword_mask: Tensor


def make_keyword_text(
    count: int, *, length: int = 24, min_length: int = 10, max_keywords: int = 3, seed: int = 0
) -> KeywordText:
    """Generate ``count`` keyword-text samples of at most ``length`` tokens, classes alternating.

    Args:
        count: number of samples.
        length: padded sequence length.
        min_length: fewest real (non-padding) tokens in a sample.
        max_keywords: most keywords in a sample (at least one).
        seed: seed of the generator.

    Returns:
        A :class:`KeywordText`.

    Example:
        >>> data = make_keyword_text(4, length=12, seed=1)
        >>> data.ids.shape, data.labels.tolist(), data.keyword_mask.any(dim=1).tolist()
        (torch.Size([4, 12]), [0, 1, 2, 0], [True, True, False, True])
        >>> keyword_ids = {VOCABULARY.index(w) for w in KEYWORDS[1]}
        >>> all(int(i) in keyword_ids for i in data.ids[1][data.keyword_mask[1]])
        True
    """
    if not 1 <= min_length <= length:
        raise ValueError(f"min_length must lie in [1, length={length}], got {min_length}.")
    if not 1 <= max_keywords <= min_length:
        raise ValueError(f"max_keywords must lie in [1, min_length={min_length}], got {max_keywords}.")
    generator = torch.Generator().manual_seed(seed)
    filler = torch.arange(1, 1 + len(_FILLER))
    keyword_ids = [torch.tensor([VOCABULARY.index(word) for word in words]) for words in KEYWORDS]
    labels = torch.arange(count) % len(TEXT_CLASSES)
    ids = torch.full((count, length), PAD_ID, dtype=torch.long)
    mask = torch.zeros(count, length, dtype=torch.bool)
    for i in range(count):
        real = int(torch.randint(min_length, length + 1, (1,), generator=generator))
        ids[i, :real] = filler[torch.randint(len(filler), (real,), generator=generator)]
        if int(labels[i]) >= len(KEYWORDS):  # neutral: filler only
            continue
        keywords = int(torch.randint(1, max_keywords + 1, (1,), generator=generator))
        positions = torch.randperm(real, generator=generator)[:keywords]
        choices = keyword_ids[int(labels[i])]
        ids[i, positions] = choices[torch.randint(len(choices), (keywords,), generator=generator)]
        mask[i, positions] = True
    return KeywordText(ids, labels, mask)
