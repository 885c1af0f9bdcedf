"""The grammar backend: offline, deterministic, compositional captions (the embedded default).

Where no language model is at hand, captions are composed from the query's fields: a noun phrase
(article, optional modifier, the bank's attribute words in random order, a name or synonym of the
concept), an optional lead ("a product photo of"), the template's frame (background, relation and
a second object) and an optional tail (", in soft studio light"). Banks supply their own phrase
pools (``ConceptBank.phrases``); the fashion bank's are catalogue-photo phrases and its attribute
words are those of the mini text-to-image model. Rewrites (LaCLIP mode) swap the lead, move the
tail and substitute synonyms, never touching concept or attribute words.

:func:`compose` is also what the mini text-to-image model's training captions are built with, so
the generator and the captioner share one vocabulary.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence

from synrep.captions.base import BACKENDS, CaptionBackend, Query, Sampling
from synrep.concepts import Concept, ConceptBank

GRAMMAR_VERSION = "1"

LEADS = ["a photo of", "a close-up photo of", "a wide shot of", "a snapshot of",
         "an overhead view of", "a detailed photograph of", "a candid photo of",
         "a blurry photo of", "a cropped photo of", "a black and white photo of",
         "a low-angle shot of", "a side view of", "an old photograph of", "a bright photo of",
         "a dim photo of", "a picture of", "a high-resolution photo of", "a film photograph of",
         "a telephoto shot of", "a macro photo of", "a phone snapshot of", "a sharp photo of"]
MODIFIERS = ["small", "large", "single", "lone", "weathered", "clean", "old", "new", "well-worn",
             "tiny", "big", "typical", "ordinary", "striking", "colorful", "pale", "shiny",
             "dusty", "wet", "half-hidden", "sunlit", "shadowed", "bright", "faded"]
TAILS = ["in soft morning light", "at dusk", "under harsh midday sun", "on an overcast day",
         "lit by a single lamp", "at night", "with a shallow depth of field", "seen from above",
         "seen from a low angle", "in sharp focus", "in warm evening light", "after the rain",
         "in winter", "in late autumn", "on a sunny afternoon", "with a blurred background",
         "in dramatic light", "under fluorescent light", "in the early morning",
         "framed off-centre", "in natural light", "on a misty day"]
BG_FORMS = ["{np} at {bg}", "{np} photographed at {bg}", "{np} with {bg} in the background",
            "{np} set against {bg}", "{np} seen at {bg}", "{bg} with {np} in view",
            "{np} and {bg} behind it", "{np} somewhere at {bg}"]
REL_FORMS = ["{np} {rel} {obj}", "{np} placed {rel} {obj}", "{obj} with {np} {rel} it",
             "{np} just {rel} {obj}", "{np} positioned {rel} {obj}"]
# Rewrite substitutions: word or phrase -> alternatives (never concept or attribute words).
SWAPS: dict[str, list[str]] = {
    "photo": ["picture", "shot", "image", "photograph"], "picture": ["photo", "image"],
    "image": ["picture", "photo"], "snapshot": ["quick photo", "snap"],
    "photograph": ["photo", "picture"], "close-up": ["close", "tight"],
    "small": ["little", "tiny"], "large": ["big", "sizeable"], "big": ["large", "sizeable"],
    "tiny": ["very small", "little"], "next to": ["beside", "alongside"],
    "beside": ["next to", "alongside"], "under": ["beneath", "underneath"],
    "below": ["beneath", "underneath"], "above": ["over", "higher than"],
    "over": ["above"], "behind": ["at the back of"], "in front of": ["ahead of"],
    "old": ["aged", "worn"], "photographed": ["captured", "pictured", "shot"],
    "seen": ["viewed", "shown"], "placed": ["set", "resting"], "positioned": ["set", "placed"],
    "centred": ["centered"], "background": ["backdrop"], "backdrop": ["background"],
    "at dusk": ["at sunset", "in the evening"], "at night": ["after dark"],
    "studio": ["photo studio"], "product photo": ["catalogue shot", "shop photo"],
    "bright": ["brightly lit"], "dim": ["dimly lit"], "detailed": ["finely detailed"],
    "shot from above": ["seen from overhead"], "laid flat": ["lying flat"],
    "isolated on black": ["alone on black"], "filling the frame": ["taking up the frame"],
    "clean": ["spotless"], "lone": ["solitary"], "single": ["solitary"],
}
_SWAP_RE = re.compile(r"(?<![\w-])(" + "|".join(
    re.escape(k) for k in sorted(SWAPS, key=len, reverse=True)) + r")(?![\w-])")
_SINGULAR_A = re.compile(r"^(uni|use|usu|eu|one|once)")


def article(phrase: str) -> str:
    """'a' or 'an' for ``phrase`` (by its first letter, with the common exceptions)."""
    p = phrase.lower()
    return "an" if p[:1] in "aeiou" and not _SINGULAR_A.match(p) else "a"


def noun_phrase(bank: ConceptBank, concept: Concept, rng: random.Random,
                attributes: Mapping[str, str] | None = None) -> str:
    """``a lightweight dark plain t-shirt``: article, modifier, attribute words, a name.

    Args:
        attributes: fixed attribute values (the generator's training captions); when None,
            each of the bank's attributes is included with probability 0.6 at a random value.
    """
    phrases = bank.phrases
    words = []
    if rng.random() < 0.7:
        words.append(rng.choice(phrases.get("modifiers", MODIFIERS)))
    attrs = []
    for attr, values in bank.attributes.items():
        if attributes is not None:
            if attr in attributes:
                attrs.append(attributes[attr])
        elif rng.random() < 0.6:
            attrs.append(rng.choice(values))
    rng.shuffle(attrs)
    words += attrs
    names = concept.names
    words.append(names[0] if len(names) == 1 or rng.random() < 0.5 else rng.choice(names))
    if phrases.get("heads"):
        words.append(rng.choice(phrases["heads"]))
    if concept.details and rng.random() < 0.5:
        words.append(rng.choice(concept.details))
    core = " ".join(words)
    return f"a pair of {core}" if concept.plural else f"{article(core)} {core}"


def compose(bank: ConceptBank, concept: Concept, template: str, rng: random.Random, *,
            background: str | None = None, relation: str | None = None, obj: str | None = None,
            attributes: Mapping[str, str] | None = None) -> str:
    """One caption for ``concept`` in ``template``'s frame."""
    np_ = noun_phrase(bank, concept, rng, attributes)
    leads = bank.phrases.get("leads", LEADS)
    if template == "c_bg":
        text = rng.choice(BG_FORMS).format(np=np_, bg=background)
        p_lead, p_tail = 0.35, 0.3
    elif template == "c_rel":
        text = rng.choice(REL_FORMS).format(np=np_, rel=relation, obj=obj)
        p_lead, p_tail = 0.35, 0.3
    else:
        text, p_lead, p_tail = np_, 0.75, 0.65
    if text.startswith(np_) and rng.random() < p_lead:
        text = f"{rng.choice(leads)} {text}"
    if rng.random() < p_tail:
        sep = ", " if rng.random() < 0.5 else " "
        text = f"{text}{sep}{rng.choice(bank.phrases.get('tails', TAILS))}"
    return text


def _strip_lead(text: str, leads: Sequence[str]) -> tuple[str, str]:
    for lead in leads:
        if text.startswith(lead + " "):
            return lead, text[len(lead) + 1:]
    return "", text


def paraphrase(text: str, rng: random.Random, leads: Sequence[str] = LEADS) -> str:
    """A rewrite of ``text``: a new lead, synonym swaps, and the tail clause moved to the front.
    May return ``text`` unchanged when nothing applies (the stage rejects that)."""
    lead, core = _strip_lead(text, sorted(leads, key=len, reverse=True))
    main, sep, tail = core.rpartition(", ")
    if not sep:
        main, tail = core, ""
    main = _SWAP_RE.sub(lambda m: rng.choice(SWAPS[m.group(1)]) if rng.random() < 0.6
                        else m.group(1), main)
    tail = _SWAP_RE.sub(lambda m: rng.choice(SWAPS[m.group(1)]), tail)
    r = rng.random()
    if r < 0.4:
        new_lead = rng.choice([x for x in leads if x != lead])
    elif r < 0.7:
        new_lead = ""
    else:
        new_lead = lead
    body = f"{new_lead} {main}".strip()
    if tail and rng.random() < 0.5:
        return f"{tail}, {body}"
    return f"{body}, {tail}" if tail else body


@BACKENDS.register("grammar")
class GrammarBackend(CaptionBackend):
    """Deterministic compositional captions; reads the structured query, not the prompt."""

    name = "grammar"
    model = f"synrep-grammar-v{GRAMMAR_VERSION}"
    uses_prompts = False

    def __init__(self, cfg=None, device: str = "cpu") -> None:
        pass

    def generate(self, queries: Sequence[Query], sampling: Sampling, seed: int) -> list[str]:
        rng = random.Random(seed)
        out = []
        for q in queries:
            if q.template == "rewrite":
                leads = q.bank.phrases.get("leads", LEADS) if q.bank else LEADS
                out.append(paraphrase(q.source or "", rng, [*leads, *LEADS]))
            else:
                out.append(compose(q.bank, q.concept, q.template, rng, background=q.background,
                                   relation=q.relation, obj=q.obj))
        return out
