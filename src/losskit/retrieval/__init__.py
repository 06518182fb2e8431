"""Sparse retrieval: LexLIP's lexicon head and an inverted index whose scores are the dense
dot products (exactly, with integer impact weights).  docs/contrastive.md."""

from losskit.retrieval.inverted_index import InvertedIndex
from losskit.retrieval.lexicon import LexiconHead

__all__ = ["InvertedIndex", "LexiconHead"]
