"""A tokenised corpus (documents back to back plus their boundaries) and its on-disk cache.

Every source (shakespeare, text, hf, synthetic) produces a :class:`Corpus`; splitting into worker shards
and validation only ever looks at a corpus, never at where it came from. Prepared corpora live under the
cache root as ``<name>/tokens.bin`` (raw tokens) + ``<name>/index.json`` (document names and boundaries).
``index.json`` is written last and only after ``tokens.bin`` is complete, so its presence marks a usable
cache; both are written to a temporary name first and moved into place with ``os.replace`` (atomic on
POSIX), so an interrupted preparation never leaves a half-written cache behind. A file lock next to the
folder keeps two processes from preparing the same corpus at once.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

FORMAT_VERSION = 1


@dataclass
class Corpus:
    """Documents as one token array: document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""

    names: list[str]
    tokens: np.ndarray  # (N,) all documents back to back, no separators
    offsets: np.ndarray  # (D + 1,) int64 document boundaries, offsets[0] == 0, offsets[-1] == N
    vocab_size: int
    sep: int | None = None
    """End-of-text token put between documents whenever their tokens are joined (None: nothing is inserted)."""

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if len(self.offsets) != len(self.names) + 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens):
            raise ValueError(
                f"corpus boundaries do not match its tokens: {len(self.names)} names, "
                f"{len(self.offsets)} offsets ending at {self.offsets[-1] if len(self.offsets) else None}, "
                f"{len(self.tokens)} tokens"
            )
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("corpus offsets must be non-decreasing")

    def __len__(self) -> int:
        return len(self.names)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_documents(
        cls, names: list[str], docs: list[np.ndarray], vocab_size: int, sep: int | None, dtype: np.dtype
    ) -> Corpus:
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(docs).astype(dtype, copy=False) if docs else np.zeros(0, dtype=dtype)
        return cls(names=list(names), tokens=tokens, offsets=offsets, vocab_size=vocab_size, sep=sep)


def token_dtype(vocab_size: int, byte_level: bool) -> np.dtype:
    """uint8 for byte-level text, uint16 while every id fits, else int32 (halves memory for 32k/50k vocabularies)."""
    if byte_level:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def cache_root(cache_dir: str | None) -> Path:
    """``data.cache_dir``, else ``$LOCOSWARM_CACHE``, else ``~/.cache/locoswarm``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LOCOSWARM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "locoswarm"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path`` in one step, else delete it."""
    tmp = _tmp_name(path)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_corpus(folder: Path, corpus: Corpus, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / "index.json"
    # Drop the completion marker first: a reader never pairs an old index with new tokens.
    index_path.unlink(missing_ok=True)
    with atomic_path(folder / "tokens.bin") as tmp:
        corpus.tokens.tofile(tmp)
    index = {
        "format": FORMAT_VERSION,
        "dtype": corpus.tokens.dtype.str,
        "num_tokens": int(len(corpus.tokens)),
        "vocab_size": int(corpus.vocab_size),
        "sep": corpus.sep,
        "names": corpus.names,
        "offsets": corpus.offsets.tolist(),
        "meta": meta,
    }
    atomic_write_bytes(index_path, json.dumps(index, indent=1).encode())


def load_corpus(folder: Path) -> Corpus | None:
    """The cached corpus, or None when the folder holds no complete, consistent cache."""
    index_path, tokens_path = folder / "index.json", folder / "tokens.bin"
    try:
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT_VERSION:
            return None
        dtype = np.dtype(index["dtype"])
        if tokens_path.stat().st_size != index["num_tokens"] * dtype.itemsize:
            return None
        tokens = np.fromfile(tokens_path, dtype=dtype)
        return Corpus(
            names=list(index["names"]),
            tokens=tokens,
            offsets=np.asarray(index["offsets"], dtype=np.int64),
            vocab_size=int(index["vocab_size"]),
            sep=index["sep"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_corpus(folder: Path, build: Callable[[], Corpus], meta: dict) -> Corpus:
    """Load ``folder``'s corpus, or build it once (under a lock shared by every process) and store it."""
    corpus = load_corpus(folder)
    if corpus is not None:
        return corpus
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        corpus = load_corpus(folder)  # another process may have finished while we waited
        if corpus is None:
            corpus = build()
            save_corpus(folder, corpus, meta)
    return corpus
