"""Concept banks: what captions are written about (see :mod:`synrep.concepts.banks`)."""

from synrep.concepts import fashion  # noqa: F401, I001  (registers the fashion bank)
from synrep.concepts.banks import (
    BANKS,
    RELATIONS,
    BankMixture,
    Concept,
    ConceptBank,
    load_bank,
    load_bank_file,
)

__all__ = ["BANKS", "RELATIONS", "BankMixture", "Concept", "ConceptBank", "load_bank",
           "load_bank_file"]
