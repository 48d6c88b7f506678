"""Tokenisers behind ``data.tokenizer``: ``byte`` (UTF-8 bytes, vocab 256) or a Hugging Face ``tokenizers`` one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from locoswarm.data.corpus import Corpus, token_dtype

# Tried in order; the first one the tokenizer knows is put between documents.
END_OF_TEXT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eot_id|>")
HF_EXTRA_HINT = "pip install 'locoswarm[hf]'"


def import_optional(module: str) -> Any:
    """Import ``datasets``/``tokenizers`` only when a config needs them, with an install hint when missing."""
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"data needs the '{module}' package, which is not installed; run: {HF_EXTRA_HINT}") from e


class TextTokenizer:
    """Turns text into a 1-D token array. ``spec`` is ``byte``, a tokenizer.json path, or a hub tokenizer name."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.byte_level = spec == "byte"
        self._tok = None
        if self.byte_level:
            self.vocab_size, self.sep = 256, None
        else:
            tokenizers = import_optional("tokenizers")
            path = Path(spec).expanduser()
            if path.is_dir() and (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            try:
                if path.is_file():
                    self._tok = tokenizers.Tokenizer.from_file(str(path))
                else:
                    self._tok = tokenizers.Tokenizer.from_pretrained(spec)
            except Exception as e:  # tokenizers raises plain Exception for both bad files and unknown names
                raise ValueError(
                    f"data.tokenizer={spec!r}: could not load it as a tokenizer.json file or a Hugging Face "
                    f"tokenizer name ({type(e).__name__}: {e}); use 'byte', a path to a tokenizer.json, "
                    "or a hub name such as 'gpt2'"
                ) from e
            self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
            self.sep = next(
                (i for t in END_OF_TEXT_CANDIDATES if (i := self._tok.token_to_id(t)) is not None),
                None,
            )
        self.dtype = token_dtype(self.vocab_size, self.byte_level)

    def cache_key(self) -> dict:
        """What identifies this tokenizer in a cache key (a local file also by its size and mtime)."""
        path = Path(self.spec).expanduser()
        if not self.byte_level and path.exists():
            path = path / "tokenizer.json" if path.is_dir() else path
            st = path.stat()
            return {"tokenizer": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return {"tokenizer": self.spec}

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        if self.byte_level:
            return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self.dtype) for e in encs]

    def retokenize(self, raw: Corpus, batch: int = 64) -> Corpus:
        """Re-encode a byte-level corpus (raw UTF-8 files) with this tokenizer."""
        if self.byte_level:
            return raw
        docs: list[np.ndarray] = []
        for start in range(0, len(raw), batch):
            idx = range(start, min(start + batch, len(raw)))
            texts = [raw.doc(i).tobytes().decode("utf-8", errors="replace") for i in idx]
            docs.extend(self.encode_batch(texts))
        return Corpus.from_documents(raw.names, docs, self.vocab_size, self.sep, self.dtype)
