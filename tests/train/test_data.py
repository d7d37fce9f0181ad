"""The corpus and the batches: fixed order, split, entropy, determinism, --data formats and their errors."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from kerneltune.train import data
from kerneltune.train.data import Batches, DataError, file_corpus, load_corpus, stdlib_corpus


@pytest.fixture(scope="module")
def stdlib():
    return stdlib_corpus()


def test_stdlib_corpus_is_the_sorted_stdlib_split_by_file(stdlib):
    root, files = data.stdlib_files()
    assert files == sorted(files) and not any("site-packages" in f for f in files)
    assert "os.py" in files and stdlib.info["files"] == len(files)
    assert stdlib.info["python"] == sys.version.split()[0]
    with open(f"{root}/{files[0]}", "rb") as f:
        first = f.read() + b"\n"
    assert bytes(stdlib.train[:len(first)]) == first  # file 0 is train, read first
    with open(f"{root}/{files[data.VAL_EVERY - 1]}", "rb") as f:
        tenth = f.read() + b"\n"
    assert bytes(stdlib.val[:len(tenth)]) == tenth  # file 9 opens the validation split
    assert stdlib.train.size + stdlib.val.size == stdlib.info["bytes"]
    assert 0.07 < stdlib.val.size / stdlib.info["bytes"] < 0.15
    assert stdlib.vocab_size == 256


def test_stdlib_corpus_is_the_same_every_time(stdlib):
    again = stdlib_corpus()
    assert again.info["sha256"] == stdlib.info["sha256"] and np.array_equal(again.val, stdlib.val)


def test_unigram_entropy_against_hand_arithmetic(tmp_path, stdlib):
    p = tmp_path / "t.txt"
    p.write_bytes(b"aaab" * 100)  # p(a) = 3/4, p(b) = 1/4
    ent = file_corpus(str(p)).unigram_entropy()
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert abs(ent["nats"] - expected) < 1e-12 and abs(ent["bits"] - expected / math.log(2)) < 1e-12
    ent = stdlib.unigram_entropy()  # Python source: between 4 and 5.5 bits per byte
    assert 4.0 < ent["bits"] < 5.5 and abs(ent["val_xent_of_train_unigram_nats"] - ent["nats"]) < 0.1


def test_text_and_uint16_token_files(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(200)) * 5)
    c = load_corpus(str(text))
    assert c.vocab_size == 256 and c.train.size == 900 and c.val.size == 100
    assert bytes(c.train[:200]) == bytes(range(200))
    tokens = np.arange(0, 60000, 7, dtype=np.uint16)
    binf = tmp_path / "t.bin"
    tokens.tofile(binf)
    c = load_corpus(str(binf))
    assert c.vocab_size == int(tokens.max()) + 1
    assert np.array_equal(np.concatenate([c.train, c.val]), tokens)
    assert c.info["kind"] == "uint16 tokens" and c.info["tokens"] == tokens.size


@pytest.mark.parametrize("name, content, words", [
    ("missing.txt", None, "no such file"),
    ("odd.bin", b"\x01\x02\x03", "odd"),
    ("empty.txt", b"", "empty"),
])
def test_bad_data_files_are_one_line_errors(tmp_path, name, content, words):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(DataError, match=words) as e:
        load_corpus(str(p))
    assert "\n" not in str(e.value)


def test_too_little_data_for_one_block(tmp_path):
    p = tmp_path / "short.txt"
    p.write_bytes(b"x" * 100)
    with pytest.raises(DataError, match="fewer than one block"):
        Batches(load_corpus(str(p)), block_size=32, batch_size=2, seed=0)


def test_batches_are_a_function_of_seed_split_and_step(stdlib):
    b1 = Batches(stdlib, block_size=16, batch_size=8, seed=3)
    b2 = Batches(stdlib, block_size=16, batch_size=8, seed=3)
    x, y = b1.get("train", 5, 0, 8)
    assert x.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    b1.get("train", 6, 0, 8)
    assert torch.equal(b2.get("train", 5, 0, 8)[0], x)  # no hidden state: step 5 is step 5
    assert not torch.equal(b1.get("train", 6, 0, 8)[0], x)
    assert not torch.equal(Batches(stdlib, 16, 8, seed=4).get("train", 5, 0, 8)[0], x)
    assert not torch.equal(b1.get("val", 5, 0, 8)[0], x)
    halves = [b1.get("train", 5, m, 4)[0] for m in range(2)]  # micro-batches tile the global batch
    assert torch.equal(torch.cat(halves), x)
    off = int(b1.offsets("train", 5)[0])
    assert bytes(stdlib.train[off:off + 16]) == bytes(x[0].tolist())
