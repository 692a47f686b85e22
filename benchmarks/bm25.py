"""BM25 Okapi: the lexical baseline that gradient-based attribution has to beat.

``score(q, d) = sum over the words t of q (repeats count) of
idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))`` with
Lucene's non-negative ``idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))``. The
corpus is read once into an inverted index whose postings already hold each
document's term weight, so scoring a query costs the postings of its words,
not a pass over the corpus.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: names, months and numbers stay whole words."""
    return WORD.findall(text.lower())


class BM25:
    """An inverted index of a tokenized corpus, scoring queries by BM25 Okapi."""

    def __init__(self, docs: Iterable[list[str]], k1: float = 1.5, b: float = 0.75) -> None:
        postings: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        lengths = []
        for doc, tokens in enumerate(docs):
            lengths.append(len(tokens))
            for term, count in Counter(tokens).items():
                postings[term][0].append(doc)
                postings[term][1].append(count)
        if not lengths:
            raise ValueError("BM25 needs at least one document")
        length = np.asarray(lengths, np.float64)
        saturation = k1 * (1 - b + b * length / max(length.mean(), 1e-12))
        self.num_docs = len(lengths)
        self.weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for term, (ids, counts) in postings.items():
            ids, tf = np.asarray(ids), np.asarray(counts, np.float64)
            idf = np.log1p((self.num_docs - len(ids) + 0.5) / (len(ids) + 0.5))
            self.weights[term] = (ids, idf * tf * (k1 + 1) / (tf + saturation[ids]))

    def scores(self, query: list[str]) -> np.ndarray:
        """``[num_docs]`` BM25 scores of one tokenized query."""
        out = np.zeros(self.num_docs)
        for term in query:
            if term in self.weights:
                ids, weight = self.weights[term]
                out[ids] += weight
        return out

    def rank(self, query: list[str]) -> np.ndarray:
        """Every document id, best first; ties go to the smaller id (as ``rayattr.topk``)."""
        return np.argsort(-self.scores(query), kind="stable")
