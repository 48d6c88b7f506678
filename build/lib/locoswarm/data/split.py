"""From a config to worker shards: load the corpus, hold out every document's tail, split the rest over workers.

Validation: the last ``data.val_fraction`` of every document (so it covers every work, and no worker ever
trains on it). Training, ``iid``: the documents' training parts back to back, cut into ``data.chunk_tokens``
chunks, shuffled with the seed and dealt round-robin (shard sizes differ by at most one chunk). ``non_iid``
(DiLoCo's clustered split): whole documents per worker; a seeded shuffle breaks ties, then greedy size
balancing puts the largest remaining document on the currently smallest shard, and a seeded permutation
decides which worker gets which group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from locoswarm.config import DataConfig, DataName, ShardSplit
from locoswarm.data.corpus import Corpus, cache_root
from locoswarm.data.hf import load_hf
from locoswarm.data.shakespeare import load_shakespeare
from locoswarm.data.sources import load_text, make_synthetic
from locoswarm.data.tokenize import TextTokenizer

# The key that controls how much data a source yields: named when shards come out too short.
SIZE_KEY = {
    DataName.shakespeare: "workers",
    DataName.text: "data.path",
    DataName.hf: "data.max_tokens",
    DataName.synthetic: "data.synthetic_tokens",
}
UNIT = {
    DataName.shakespeare: "works",
    DataName.text: "files",
    DataName.hf: "documents",
    DataName.synthetic: "documents",
}


@dataclass
class TokenData:
    train_shards: list[np.ndarray]
    """One 1-D token array per worker (len == workers)."""
    val: np.ndarray
    """Held-out tokens no worker trains on (the tail of every document)."""
    vocab_size: int
    shard_documents: list[list[str]]
    """Names of the documents each worker's shard came from (disjoint sets for non_iid)."""
    description: str
    """One line, e.g. 'shakespeare: 42 works, 4.8M train / 0.253M val tokens, iid over 4 workers'."""


def _enum(enum_cls, value, key: str):
    try:
        return enum_cls(value.value if hasattr(value, "value") else value)
    except ValueError:
        allowed = ", ".join(e.value for e in enum_cls)
        raise ValueError(f"{key}={value!r} is invalid: allowed {allowed}") from None


def load_corpus_for(cfg: DataConfig) -> Corpus:
    """The tokenised corpus ``cfg`` describes (prepared and cached on first use where that is slow)."""
    name = _enum(DataName, cfg.name, "data.name")
    root = cache_root(cfg.cache_dir)
    if name is DataName.synthetic:
        return make_synthetic(cfg.synthetic_tokens)
    if name is DataName.hf:
        return load_hf(cfg.path, cfg.hf_config, cfg.hf_split, cfg.text_field, cfg.tokenizer, cfg.max_tokens, root)
    raw = load_shakespeare(root) if name is DataName.shakespeare else load_text(cfg.path)
    return TextTokenizer(cfg.tokenizer).retokenize(raw)


def _join(parts: list[np.ndarray], sep: int | None, dtype: np.dtype) -> np.ndarray:
    """Concatenate, with the end-of-text token between consecutive parts when the tokenizer has one."""
    parts = [p for p in parts if len(p)]
    if sep is not None and len(parts) > 1:
        sep_arr = np.array([sep], dtype=dtype)
        parts = [x for p in parts for x in (p, sep_arr)][:-1]
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)


def _mega(n: int) -> str:
    return f"{n / 1e6:.3g}M"


def split_corpus(
    corpus: Corpus, split: ShardSplit, workers: int, seed: int, val_fraction: float, chunk_tokens: int
) -> tuple[list[np.ndarray], np.ndarray, list[list[str]], list[np.ndarray]]:
    """(train shards, val, shard document names, per-document train parts) without any length checks."""
    dtype = corpus.tokens.dtype
    lengths = corpus.lengths
    n_val = np.minimum(lengths, np.ceil(lengths * val_fraction).astype(np.int64))
    train_parts = [corpus.doc(i)[: lengths[i] - n_val[i]] for i in range(len(corpus))]
    val = _join([corpus.doc(i)[lengths[i] - n_val[i] :] for i in range(len(corpus))], corpus.sep, dtype)
    rng = np.random.default_rng(seed)

    if split is ShardSplit.iid:
        stream = _join(train_parts, corpus.sep, dtype)
        # Where each document's training part starts in `stream` (one separator after each part but the last).
        kept = [i for i in range(len(corpus)) if len(train_parts[i])]
        starts, pos = [], 0
        for i in kept:
            starts.append(pos)
            pos += len(train_parts[i]) + (1 if corpus.sep is not None else 0)
        starts_arr = np.asarray(starts, dtype=np.int64)
        n_full, partial = divmod(len(stream), chunk_tokens)
        # A short last chunk is dealt last, so it lands on a worker that would otherwise hold an extra full
        # chunk (or one less): shard sizes then differ by at most one chunk.
        order = np.concatenate([rng.permutation(n_full), [n_full] if partial else []]).astype(np.int64)
        shards, docs = [], []
        for w in range(workers):
            mine = order[w::workers]
            shards.append(_join([stream[c * chunk_tokens : (c + 1) * chunk_tokens] for c in mine], None, dtype))
            touched: set[int] = set()
            for c in mine:
                lo, hi = c * chunk_tokens, min((c + 1) * chunk_tokens, len(stream))
                first = int(np.searchsorted(starts_arr, lo, side="right")) - 1
                last = int(np.searchsorted(starts_arr, hi - 1, side="right")) - 1
                touched.update(range(max(first, 0), last + 1))
            docs.append([corpus.names[kept[j]] for j in sorted(touched)])
        return shards, val, docs, train_parts

    # non_iid: shuffle first so equal-length documents are placed in seeded order, then largest first.
    perm = rng.permutation(len(corpus))
    by_size = perm[np.argsort(-lengths[perm], kind="stable")]
    loads = np.zeros(workers, dtype=np.int64)
    assigned: list[list[int]] = [[] for _ in range(workers)]
    for i in by_size:
        w = int(np.argmin(loads))  # first of the currently smallest
        assigned[w].append(int(i))
        loads[w] += len(train_parts[i])
    # Distinct sizes fix the grouping; the seed still decides which worker gets which group (that matters
    # when workers differ, e.g. network.compute_speed) and how equal-size documents are grouped.
    assigned = [assigned[g] for g in rng.permutation(workers)]
    shards = [_join([train_parts[i] for i in idx], corpus.sep, dtype) for idx in assigned]
    docs = [[corpus.names[i] for i in idx] for idx in assigned]
    return shards, val, docs, train_parts


def build_token_data(cfg: DataConfig, workers: int, seed: int, seq_len: int) -> TokenData:
    """Worker shards and validation tokens for ``workers`` workers; same arguments ⇒ identical arrays."""
    name = _enum(DataName, cfg.name, "data.name")
    split = _enum(ShardSplit, cfg.split, "data.split")
    if workers < 1:
        raise ValueError(f"workers={workers} is invalid: need at least 1 worker")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} is invalid: must be in (0, 1)")
    if cfg.chunk_tokens < 1:
        raise ValueError(f"data.chunk_tokens={cfg.chunk_tokens} is invalid: must be >= 1")

    corpus = load_corpus_for(cfg)
    unit = UNIT[name]
    if split is ShardSplit.non_iid and len(corpus) < workers:
        raise ValueError(
            f"data.split=non_iid gives whole {unit} to workers, but the corpus has {len(corpus)} {unit} "
            f"for workers={workers}; use data.split=iid, fewer workers, or more {unit}"
        )
    shards, val, docs, _ = split_corpus(corpus, split, workers, seed, cfg.val_fraction, cfg.chunk_tokens)

    need = seq_len + 1
    total_train = sum(len(s) for s in shards)
    for w, shard in enumerate(shards):
        if len(shard) < need:
            if split is ShardSplit.iid and total_train // workers >= need:
                key, hint = "data.chunk_tokens", f"data.chunk_tokens={cfg.chunk_tokens} makes too few chunks"
            elif split is ShardSplit.non_iid and total_train // workers >= need:
                key, hint = "data.split", "non_iid cannot balance these documents; use data.split=iid"
            else:
                key, hint = SIZE_KEY[name], "not enough training tokens for this many workers; use more data"
            raise ValueError(
                f"{key}: worker {w}'s shard would have {len(shard)} tokens, fewer than model.seq_len+1={need} "
                f"({total_train} training tokens over workers={workers}, data.split={split.value}); {hint}"
            )
    if len(val) < need:
        raise ValueError(
            f"data.val_fraction={cfg.val_fraction}: validation would have {len(val)} tokens, fewer than "
            f"model.seq_len+1={need}; raise data.val_fraction or use more data"
        )
    description = (
        f"{name.value}: {len(corpus)} {unit}, {_mega(total_train)} train / {_mega(len(val))} val tokens, "
        f"{split.value} over {workers} worker{'s' if workers != 1 else ''}"
    )
    return TokenData(
        train_shards=shards,
        val=val,
        vocab_size=corpus.vocab_size,
        shard_documents=docs,
        description=description,
    )
