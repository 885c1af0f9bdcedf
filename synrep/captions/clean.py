"""Cleaning raw completions into captions, with every rejection counted by reason.

Order of checks (the first that fails names the reason): ``empty`` (nothing on the first line),
``prompt_echo`` (the model repeated the header, a demonstration, the query or the ``=>``
separator), ``too_short`` / ``too_long`` (word bounds), ``no_concept`` (the caption does not name
its concept or a synonym; optional), ``unchanged`` (a rewrite equal to its source),
``duplicate`` (same normalised text as a kept caption) and ``near_duplicate`` (MinHash
Jaccard similarity at or above the threshold).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache

from synrep.captions.minhash import NearDuplicateIndex
from synrep.captions.templates import SEP

REASONS = ("empty", "prompt_echo", "too_short", "too_long", "no_concept", "unchanged",
           "duplicate", "near_duplicate")
_WS = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]")  # control chars, U+FFFD
# ASCII punctuation but the hyphen ("t-shirt") becomes a space
_PUNCT = str.maketrans({c: " " for c in string.punctuation if c != "-"})


def first_line(text: str) -> str:
    """The completion's first line, whitespace collapsed and control characters (and the
    replacement character of undecodable bytes) removed; leading blanks are skipped, lines not."""
    line = text.lstrip(" \t").split("\n", 1)[0]
    if not line.isprintable() or "\ufffd" in line:
        line = _CONTROL.sub("", line)
    return " ".join(line.split())


def normalise(text: str) -> str:
    """Lower case, ASCII punctuation but hyphens dropped, whitespace collapsed: the key for
    exact dedup."""
    return " ".join(text.lower().translate(_PUNCT).split())


@lru_cache(maxsize=65536)
def _names_pattern(names: tuple[str, ...]) -> re.Pattern:
    alts = "|".join(re.escape(normalise(n)) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alts})(?:s|es)?(?![\w-])")


def mentions(text_norm: str, names: Iterable[str]) -> bool:
    """Whether normalised text names one of ``names`` as whole words (plurals accepted)."""
    return _names_pattern(tuple(names)).search(text_norm) is not None


class CaptionFilter:
    """Checks completions in order and keeps the dedup state across a whole run.

    Args:
        min_words, max_words: word-count bounds of a kept caption.
        require_concept: reject captions that do not name their concept.
        near_dup_threshold: Jaccard similarity for near-duplicates; 1.0 turns the check off.
        num_perm: MinHash permutations.
    """

    def __init__(self, min_words: int, max_words: int, require_concept: bool,
                 near_dup_threshold: float, num_perm: int) -> None:
        if min_words < 1 or max_words < min_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        self.min_words, self.max_words = min_words, max_words
        self.require_concept = require_concept
        self.seen: set[str] = set()
        self.near = (NearDuplicateIndex(near_dup_threshold, num_perm)
                     if near_dup_threshold < 1.0 else None)
        self.stats: Counter[str] = Counter()

    def remember(self, captions: list[str]) -> None:
        """Add already-kept captions (from complete shards, when resuming)."""
        norms = [normalise(c) for c in captions]
        self.seen.update(norms)
        if self.near is not None:
            sigs = self.near.signatures(norms)
            for sig, keys in zip(sigs, self.near.band_keys(sigs)):
                self.near.add(sig, keys)

    def reject_reason(self, caption: str, norm: str, names: Iterable[str] | None,
                      echoes: set[str], source: str | None = None) -> str | None:
        """The first failing content check, before dedup; None when the caption passes."""
        if not caption:
            return "empty"
        if SEP.strip() in caption or norm in echoes:
            return "prompt_echo"
        n_words = len(norm.split())
        if n_words < self.min_words:
            return "too_short"
        if n_words > self.max_words:
            return "too_long"
        if self.require_concept and names is not None and not mentions(norm, names):
            return "no_concept"
        if source is not None and norm == normalise(source):
            return "unchanged"
        return None

    def filter(self, raws: list[str], names: list[Iterable[str] | None],
               echoes: list[set[str]], limit: int, sources: list[str] | None = None,
               dedup: bool = True) -> list[tuple[int, str, str]]:
        """Clean ``raws`` in order; return ``(index, caption, normalised caption)`` of at most
        ``limit`` kept ones.

        Kept captions enter the dedup state; candidates after the ``limit``-th kept one are
        neither counted nor remembered (the next round regenerates them)."""
        captions = [first_line(r) for r in raws]
        norms = [normalise(c) for c in captions]
        near = self.near if dedup else None
        if near is not None:
            sigs = near.signatures(norms)
            keys = near.band_keys(sigs)
        kept: list[tuple[int, str, str]] = []
        for i, (cap, norm) in enumerate(zip(captions, norms)):
            if len(kept) == limit:
                break
            reason = self.reject_reason(cap, norm, names[i], echoes[i],
                                        sources[i] if sources else None)
            if reason is None and dedup and norm in self.seen:
                reason = "duplicate"
            if reason is None and near is not None and near.find(sigs[i], keys[i]) is not None:
                reason = "near_duplicate"
            if reason:
                self.stats[reason] += 1
                continue
            if dedup:
                self.seen.add(norm)
                if near is not None:
                    near.add(sigs[i], keys[i])
            kept.append((i, cap, norm))
        return kept
