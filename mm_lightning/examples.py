"""The examples of a names file, stored compactly and gathered per batch.

The lecture's build_dataset makes every character of every word, and each word's end, one example of block_size
int64 context indices and an int64 target: ~32 bytes a character with block_size 3, ~32x the file's size. Here a
split is one token stream in the smallest integer dtype that holds the vocabulary (uint8 for names.txt's 27
characters): each word as block_size boundary tokens, its characters and the end token. Example i is the window
of block_size + 1 tokens that starts at i + block_size * (the index of its word in the split): the context, then
the target. A batch is gathered from the stream and widened to int64 (what the model's embedding takes): the same
tensors, bit for bit, as the lecture's (tests/test_data.py). That is 1 byte an example and block_size + 4 bytes a
word (its padding and the index of its first example): 2.0 bytes an example for names.txt with block_size 3.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass
from itertools import accumulate

import torch

CHUNK = 1 << 22  # characters placed at once while building a stream: bounds the int64 index temporaries (~200 MB)


def compact_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every vocabulary index."""
    if vocab_size <= 256:
        return torch.uint8
    return torch.int16 if vocab_size <= 2**15 else torch.int32


@dataclass
class Corpus:
    """A names file's words as vocabulary indices: `tokens`, every word's characters one after another (in the
    file's order, in compact_dtype), and `lengths`, each word's length (int32: a word has at most 1000)."""

    vocab: str
    tokens: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_examples(self) -> int:
        return len(self.tokens) + len(self.lengths)  # every character, and each word's end

    @classmethod
    def of(cls, words: list[str], vocab: str) -> Corpus:
        """Encode a list of words; a character outside the vocabulary raises KeyError, as the lecture's stoi[ch]."""
        text = "".join(words)
        points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32) if text else None
        del text
        tokens = torch.empty(0, dtype=compact_dtype(len(vocab)))
        if points is not None:
            codes = torch.tensor([ord(c) for c in vocab], dtype=torch.int32)
            order = torch.argsort(codes)
            found = torch.searchsorted(codes[order], points).clamp_(max=len(vocab) - 1)
            if not torch.equal(codes[order][found], points):
                raise KeyError(chr(int(points[codes[order][found] != points][0])))
            tokens = order[found].to(tokens.dtype)
        return cls(vocab, tokens, torch.tensor([len(word) for word in words], dtype=torch.int32))

    def words(self) -> list[str]:
        """The words as strings again (~60 bytes a word in Python: for small files and tests)."""
        text = "".join(map(self.vocab.__getitem__, self.tokens.tolist()))
        ends = list(accumulate(self.lengths.tolist()))
        return [text[end - n : end] for end, n in zip(ends, self.lengths.tolist())]


def split_order(num_words: int, seed: int) -> dict[str, torch.Tensor]:
    """Word indices of the lecture's split: random.seed(seed); random.shuffle(words); cut at 80% and 90%.

    random.shuffle draws the same swaps for any sequence of the same length, so shuffling indices gives the
    lecture's order; they are shuffled in an array of int32 (4 bytes a word; a list of Python ints takes ~40)."""
    dtype = index_dtype(num_words)
    order = array("i" if dtype == torch.int32 else "q", range(num_words))
    random.Random(seed).shuffle(order)
    perm = torch.frombuffer(order, dtype=dtype).clone() if num_words else torch.empty(0, dtype=dtype)
    n1, n2 = int(0.8 * num_words), int(0.9 * num_words)
    return {"train": perm[:n1], "val": perm[n1:n2], "test": perm[n2:]}


class Examples:
    """One split's examples (see the module's docstring): `stream`, the split's words padded as the lecture pads
    them, and `first`, the index of each word's first example (index_dtype)."""

    def __init__(self, stream: torch.Tensor, first: torch.Tensor, block_size: int, num_examples: int):
        self.stream, self.first, self.block_size, self.num_examples = stream, first, block_size, num_examples
        self._context = torch.arange(block_size)

    def __len__(self) -> int:
        return self.num_examples

    @property
    def nbytes(self) -> int:
        return self.stream.nbytes + self.first.nbytes

    def gather(self, ix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ix (int64, any shape): contexts (*ix.shape, block_size) and targets (*ix.shape), int64."""
        word = torch.searchsorted(self.first, ix.to(self.first.dtype), right=True) - 1
        start = ix + self.block_size * word  # where example ix's window begins in the stream
        x = self.stream[start.unsqueeze(-1) + self._context].long()
        return x, self.stream[start + self.block_size].long()

    def slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather(torch.arange(start, stop))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as the lecture's int64 (X, Y): ~32 bytes an example; for evaluating a whole split."""
        return self.slice(0, len(self))


def build_examples(corpus: Corpus, words: torch.Tensor, block_size: int) -> Examples:
    """The examples of corpus' words `words` (indices, in this order)."""
    src = _starts(corpus.lengths).index_select(0, words)  # where each word's characters are in corpus.tokens
    lengths = corpus.lengths.index_select(0, words)
    # in the stream a word takes block_size boundary tokens, its characters, the end token: where its characters go
    dst = _starts(lengths, block_size + 1).add_(block_size)
    size = int(dst[-1] + lengths[-1] + 1) if len(words) else 0
    stream = torch.zeros(size, dtype=corpus.tokens.dtype)  # zeros: the boundary token, index 0
    # the characters, copied about CHUNK at a time: their int64 indices take 8 bytes each
    cuts = torch.searchsorted(dst, torch.arange(CHUNK, max(CHUNK, size), CHUNK)).tolist()
    for lo, hi in zip([0, *cuts], [*cuts, len(words)]):
        if lo < hi:
            n = lengths[lo:hi].long()
            stream.index_copy_(0, _runs(dst[lo:hi], n), corpus.tokens.index_select(0, _runs(src[lo:hi], n)))
    del src, dst
    first = _starts(lengths, 1)
    return Examples(stream, first, block_size, int(first[-1] + lengths[-1] + 1) if len(words) else 0)


def _starts(lengths: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Where each of consecutive runs of lengths[i] + pad items starts, computed in place in one tensor of the
    index dtype their total needs."""
    out = lengths.to(index_dtype(int(lengths.sum(dtype=torch.int64)) + pad * len(lengths)), copy=True).add_(pad)
    return torch.cumsum(out, 0, out=out).sub_(lengths).sub_(pad)


def index_dtype(count: int) -> torch.dtype:
    """int32 for indices below 2**31 (every index of a names file under the 1 GiB limit): half of int64's memory."""
    return torch.int32 if count < 2**31 else torch.int64


def _runs(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """starts[i], starts[i] + 1, ..., starts[i] + lengths[i] - 1 for every i, one after another (int64): a step of
    1 everywhere but at each run's head, summed."""
    if not bool(lengths.all()):  # (an empty word, possible only through build_windows: no characters to place)
        starts, lengths = starts[lengths > 0], lengths[lengths > 0]
    step = torch.ones(int(lengths.sum()), dtype=torch.int64)
    if not len(step):
        return step
    heads = torch.cumsum(lengths, 0).sub_(lengths)
    step[heads[1:]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    step[0] = starts[0]
    return torch.cumsum(step, 0, out=step)


def memory_needed(corpus: Corpus, block_size: int) -> tuple[int, int]:
    """(bytes the three splits' examples take, bytes storing them needs at most, beyond the corpus)."""
    words, itemsize = len(corpus), corpus.tokens.element_size()
    index = index_dtype(corpus.num_examples + words * block_size).itemsize
    stored = (corpus.num_examples + words * block_size) * itemsize + words * index
    building = words * (4 + 3 * index) + min(CHUNK, len(corpus.tokens)) * 8 * 5  # per-word offsets, chunk indices
    return stored, stored + building
