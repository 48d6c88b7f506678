"""``data=hf``: stream a Hugging Face dataset (hub name, or a local .jsonl/.json/.parquet file), tokenise, cache.

Streaming keeps memory flat for unbounded sets like FineWeb-Edu; reading stops at ``data.max_tokens``. The
tokenised result is cached under ``hf-<name>-<hash>/`` keyed by everything that changes it (source, config,
split, text field, tokenizer, max_tokens; a local file or tokenizer also by its size and mtime).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from locoswarm.data.corpus import Corpus, cached_corpus
from locoswarm.data.tokenize import TextTokenizer, import_optional

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BATCH_DOCS = 256


def _source(path: str) -> tuple[str, Path | None]:
    """(builder or hub name, local file or None)."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if p.is_file():
        if suffix not in LOCAL_BUILDERS:
            raise ValueError(f"data.path={path!r}: a local file for data=hf must be one of {sorted(LOCAL_BUILDERS)}")
        return LOCAL_BUILDERS[suffix], p
    if suffix in LOCAL_BUILDERS or p.is_dir():
        raise ValueError(
            f"data.path={path!r} does not exist as a local {suffix or 'data'} file "
            "(data=hf takes a .jsonl/.json/.parquet file or a Hugging Face hub dataset name)"
        )
    return path, None


def _rows(path: str, hf_config: str | None, hf_split: str) -> Iterable[dict]:
    datasets = import_optional("datasets")
    builder, local = _source(path)
    if local is not None:
        return datasets.load_dataset(builder, data_files=str(local), split="train", streaming=True)
    try:
        return datasets.load_dataset(builder, hf_config, split=hf_split, streaming=True)
    except Exception as e:  # offline, unknown name, gated set, bad config/split: all surface here
        raise RuntimeError(
            f"data.path={path!r} (data.hf_config={hf_config!r}, data.hf_split={hf_split!r}): could not open it as a "
            f"Hugging Face hub dataset ({type(e).__name__}: {e}); a local file must end in "
            f"{'/'.join(sorted(LOCAL_BUILDERS))} and exist"
        ) from e


def _texts(rows: Iterable[dict], text_field: str, path: str) -> Iterator[tuple[int, str]]:
    for i, row in enumerate(rows):
        if text_field not in row:
            raise ValueError(
                f"data.text_field={text_field!r} is not a column of {path!r}; available columns: {sorted(row)}"
            )
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise ValueError(f"data.text_field={text_field!r} of {path!r} holds {type(text).__name__}, not text")
        if text:
            yield i, text


def _build(
    path: str, hf_config: str | None, hf_split: str, text_field: str, tok: TextTokenizer, max_tokens: int
) -> Corpus:
    label = Path(path).name if _source(path)[1] is not None else path
    names: list[str] = []
    docs: list[np.ndarray] = []
    total = 0
    batch: list[tuple[int, str]] = []

    def flush() -> bool:
        nonlocal total
        for (i, _), ids in zip(batch, tok.encode_batch([t for _, t in batch]), strict=True):
            if len(ids) == 0:
                continue
            ids = ids[: max_tokens - total]
            names.append(f"{label}#{i}")
            docs.append(ids)
            total += len(ids)
            if total >= max_tokens:
                return True
        batch.clear()
        return False

    for item in _texts(_rows(path, hf_config, hf_split), text_field, path):
        batch.append(item)
        if len(batch) >= BATCH_DOCS and flush():
            break
    else:
        flush()
    if not docs:
        raise ValueError(f"data.path={path!r} yielded no text in column data.text_field={text_field!r}")
    return Corpus.from_documents(names, docs, tok.vocab_size, tok.sep, tok.dtype)


def load_hf(
    path: str | None,
    hf_config: str | None,
    hf_split: str,
    text_field: str,
    tokenizer: str,
    max_tokens: int,
    root: Path,
) -> Corpus:
    if not path:
        raise ValueError("data.path is not set: data=hf needs a .jsonl/.json/.parquet file or a hub dataset name")
    if max_tokens < 1:
        raise ValueError(f"data.max_tokens={max_tokens} must be >= 1")
    _, local = _source(path)
    tok = TextTokenizer(tokenizer)
    key: dict = {"config": hf_config, "split": hf_split, "field": text_field, "max_tokens": max_tokens}
    key.update(tok.cache_key())
    if local is not None:
        st = local.stat()
        key.update(path=str(local.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns, split="train")
    else:
        key["path"] = path
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).name if local is not None else path)[:48]
    return cached_corpus(
        root / f"hf-{slug}-{digest}",
        lambda: _build(path, hf_config, hf_split, text_field, tok, max_tokens),
        meta=key,
    )
