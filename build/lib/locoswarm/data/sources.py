"""Local sources: ``text`` (your .txt files, one document each) and ``synthetic`` (a learnable toy language)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from locoswarm.data.corpus import Corpus

SYNTHETIC_VOCAB = 64
SYNTHETIC_TOPICS = 4
SYNTHETIC_BRANCHING = 4
SYNTHETIC_SEED = 1234
"""The synthetic language is the same for every run seed, so seeds vary the training, not the task."""


def load_text(path: str | None) -> Corpus:
    """Every ``.txt`` file at ``path`` (a file, or a folder searched recursively) as one byte-level document."""
    if not path:
        raise ValueError("data.path is not set: data=text needs a .txt file or a folder of .txt files")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"data.path={path!r} does not exist (data=text needs a .txt file or a folder of them)")
    if p.is_file():
        if p.suffix.lower() != ".txt":
            raise ValueError(f"data.path={path!r} is not a .txt file (data=text reads .txt files only)")
        files, base = [p], p.parent
    else:
        files, base = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() == ".txt"), p
    names, docs = [], []
    for f in files:
        data = f.read_bytes()
        if data:  # an empty file is no document
            names.append(f.relative_to(base).as_posix())
            docs.append(np.frombuffer(data, dtype=np.uint8))
    if not docs:
        raise ValueError(f"data.path={path!r} holds no non-empty .txt file (searched recursively)")
    return Corpus.from_documents(names, docs, vocab_size=256, sep=None, dtype=np.dtype(np.uint8))


def make_synthetic(num_tokens: int) -> Corpus:
    """``num_tokens`` tokens from a mixture of sparse random Markov chains over a 64-token vocabulary.

    There are 4 "topics", each its own first-order chain in which every token has 4 possible successors with
    Dirichlet-drawn probabilities; each document follows one topic (document ``d`` uses topic ``d % 4``). So
    a model can learn it well (per-topic entropy is far below log 64), and non_iid shards genuinely differ.
    At least 32 documents of near-equal length, generated all at once (one numpy step per position).
    """
    if num_tokens < 1:
        raise ValueError(f"data.synthetic_tokens={num_tokens} must be >= 1")
    rng = np.random.default_rng(SYNTHETIC_SEED)
    V, K, T = SYNTHETIC_VOCAB, SYNTHETIC_BRANCHING, SYNTHETIC_TOPICS
    succ = np.stack([np.stack([rng.choice(V, size=K, replace=False) for _ in range(V)]) for _ in range(T)])  # (T,V,K)
    cum = np.cumsum(rng.dirichlet(np.full(K, 0.5), size=(T, V)), axis=-1)  # (T, V, K)
    cum[..., -1] = 1.0  # guard the last bucket against rounding

    n_docs = min(num_tokens, max(32, math.ceil(num_tokens / 65536)))
    lengths = np.full(n_docs, num_tokens // n_docs, dtype=np.int64)
    lengths[: num_tokens % n_docs] += 1
    L = int(lengths.max())
    topic = np.arange(n_docs) % T
    u = rng.random((L, n_docs))
    out = np.empty((L, n_docs), dtype=np.uint16)
    state = rng.integers(0, V, size=n_docs)
    out[0] = state
    for t in range(1, L):
        c = cum[topic, state]  # (D, K)
        k = np.minimum((u[t][:, None] > c).sum(axis=1), K - 1)
        state = succ[topic, state, k]
        out[t] = state
    docs = [out[: lengths[d], d] for d in range(n_docs)]
    names = [f"synthetic-{d:03d}-topic{topic[d]}" for d in range(n_docs)]
    return Corpus.from_documents(names, docs, vocab_size=V, sep=None, dtype=np.dtype(np.uint16))
