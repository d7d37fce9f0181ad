"""Training data: the embedded default corpus (the Python standard library's own source), or --data.

Default corpus, no download: every `*.py` file under `sysconfig.get_paths()["stdlib"]` (site-packages
and __pycache__ left out), sorted by relative path, each file's bytes followed by one b"\\n", tokens
are bytes (vocab 256). Split by file: every tenth file in that order (index % 10 == 9) is validation,
the rest training, so both splits hold code from across the library. The standard library differs
between Python versions, so the corpus is identified by Python version, size and sha256.

--data FILE: a `.bin` file is uint16 tokens (nanoGPT's prepare.py format, native byte order), anything
else is text read as bytes. The last 10% of the tokens is validation.

Batches are a pure function of (seed, split, step): the same seed gives the same batches on any
number of processes, and resuming at step s needs no saved data position beyond s.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

VAL_EVERY = 10  # stdlib corpus: file i goes to validation when i % VAL_EVERY == VAL_EVERY - 1
VAL_FRACTION = 0.1  # --data: the tail that is validation
ENTROPY_MAX_TOKENS = 1 << 28  # unigram statistics of a larger --data file come from its first 256M tokens


class DataError(ValueError):
    """A one-line, user-facing problem with the training data."""


@dataclass
class Corpus:
    name: str
    train: np.ndarray  # 1-D tokens (uint8 or uint16)
    val: np.ndarray
    vocab_size: int  # largest token + 1
    info: dict = field(default_factory=dict)  # provenance: source, bytes, sha256, python, files …

    def unigram_entropy(self) -> dict:
        """Entropy of the token frequencies over the whole corpus: what a model that ignores context
        could reach at best (and the cross-entropy on val of the train frequencies, what it reaches there)."""
        n = max(self.vocab_size, 1)
        ct = np.bincount(self.train[:ENTROPY_MAX_TOKENS], minlength=n).astype(np.float64)
        cv = np.bincount(self.val[:ENTROPY_MAX_TOKENS], minlength=n).astype(np.float64)
        p = (ct + cv) / (ct.sum() + cv.sum())
        nats = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        q = (ct + 1) / (ct.sum() + n)  # add-one so an unseen val token costs finite nats
        val_xent = float(-(cv * np.log(q)).sum() / cv.sum())
        return {"nats": nats, "bits": nats / math.log(2), "val_xent_of_train_unigram_nats": val_xent}


def stdlib_files(root: Optional[str] = None) -> tuple[str, list[str]]:
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")]
        files += [os.path.relpath(os.path.join(d, f), root) for f in names if f.endswith(".py")]
    return root, sorted(f.replace(os.sep, "/") for f in files)


def stdlib_corpus(root: Optional[str] = None) -> Corpus:
    root, files = stdlib_files(root)
    if len(files) < VAL_EVERY:
        raise DataError(f"{root}: only {len(files)} .py files in the standard library; give --data FILE")
    h = hashlib.sha256()
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    for i, rel in enumerate(files):
        with open(os.path.join(root, rel), "rb") as f:
            b = f.read() + b"\n"
        h.update(b)
        parts[i % VAL_EVERY == VAL_EVERY - 1].append(b)
    train = np.frombuffer(b"".join(parts[0]), dtype=np.uint8)
    val = np.frombuffer(b"".join(parts[1]), dtype=np.uint8)
    info = {"source": "python-stdlib", "root": root, "python": sys.version.split()[0], "files": len(files),
            "bytes": int(train.size + val.size), "sha256": h.hexdigest(),
            "split": f"file i is val when i % {VAL_EVERY} == {VAL_EVERY - 1}"}
    return Corpus(f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}", train, val, 256, info)


def file_corpus(path: str) -> Corpus:
    if not os.path.isfile(path):
        raise DataError(f"--data {path}: no such file (give a text file or a uint16 .bin token file)")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"--data {path}: the file is empty")
    if path.endswith(".bin"):
        if size % 2:
            raise DataError(f"--data {path}: {size} bytes is odd, a .bin file holds uint16 tokens "
                            "(rename it if it is text)")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")  # large token files stay on disk
        kind = "uint16 tokens"
    else:
        with open(path, "rb") as f:
            tokens = np.frombuffer(f.read(), dtype=np.uint8)
        kind = "text bytes"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    cut = int(tokens.size * (1 - VAL_FRACTION))
    info = {"source": os.path.abspath(path), "kind": kind, "tokens": int(tokens.size), "bytes": size,
            "sha256": h.hexdigest(), "python": sys.version.split()[0],
            "split": f"last {VAL_FRACTION:.0%} of the tokens is val"}
    vocab = int(tokens[:ENTROPY_MAX_TOKENS].max()) + 1 if kind == "uint16 tokens" else 256
    return Corpus(os.path.basename(path), tokens[:cut], tokens[cut:], vocab, info)


def load_corpus(data: Optional[str] = None) -> Corpus:
    return file_corpus(data) if data else stdlib_corpus()


class Batches:
    """Global batches of `batch_size` sequences of `block_size` + 1 tokens at random offsets, drawn from a
    generator seeded by (seed, split, step). `get(split, step, micro, micro_batch)` is one micro-batch:
    rows [micro * micro_batch, (micro + 1) * micro_batch) of that step's global batch."""

    def __init__(self, corpus: Corpus, block_size: int, batch_size: int, seed: int, device: str = "cpu"):
        self.block_size, self.batch_size, self.seed, self.device = block_size, batch_size, seed, device
        self.splits = {"train": corpus.train, "val": corpus.val}
        for split, data in self.splits.items():
            if data.size < block_size + 1:
                raise DataError(f"{corpus.name}: the {split} split has {data.size} tokens, fewer than one "
                                f"block of {block_size} + 1; give more data (--data) or a preset with a shorter "
                                f"context (--preset)")
        self._cache: dict = {}

    def offsets(self, split: str, step: int) -> np.ndarray:
        key = (split, step)
        if key not in self._cache:  # one draw per (split, step), shared by every micro-batch of that step
            digest = hashlib.blake2b(f"{self.seed}/{split}/{step}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            hi = self.splits[split].size - self.block_size - 1
            self._cache = {key: torch.randint(0, hi + 1, (self.batch_size,), generator=g).numpy()}
        return self._cache[key]

    def get(self, split: str, step: int, micro: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        ix = self.offsets(split, step)[micro * micro_batch:(micro + 1) * micro_batch]  # (b,)
        xy = torch.from_numpy(self.splits[split][ix[:, None] + np.arange(self.block_size + 1)].astype(np.int64))
        x, y = xy[:, :-1], xy[:, 1:]  # (b, T) inputs and next-token targets
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.contiguous(), y.contiguous()
