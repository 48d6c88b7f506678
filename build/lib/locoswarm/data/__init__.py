"""Token data for training: sources (shakespeare, text, hf, synthetic), worker shards, and batch sampling.

``build_token_data(cfg.data, workers, seed, seq_len)`` gives each worker its shard and a shared validation set;
``BatchSampler(shard, batch_size, seq_len, seed)`` draws resumable random windows from one shard.
"""

from __future__ import annotations

from locoswarm.data.corpus import Corpus, cache_root
from locoswarm.data.sampler import BatchSampler
from locoswarm.data.split import TokenData, build_token_data, load_corpus_for

__all__ = ["BatchSampler", "Corpus", "TokenData", "build_token_data", "cache_root", "load_corpus_for"]
