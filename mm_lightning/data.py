"""Names data: reading and checking the file, the vocabulary, the lecture's context windows and 80/10/10 split,
and the DataModule that serves training minibatches and whole-split evaluation batches."""

from __future__ import annotations

import hashlib
import os
import random
import re
import sys
import tempfile
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from mm_lightning.errors import UsageError

BOUNDARY = "."  # token 0: pads the context before a word and marks its end
DEFAULT_PATH = "data/names.txt"
NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
MAX_WORD_LENGTH = 1000  # longer lines are not words: the file is probably not one-word-per-line
MAX_FILE_BYTES = 1 << 30  # 1 GiB: names.txt is 228 kB; the windows of a larger file would not fit in memory anyway


# ---------------------------------------------------------------------------------------------- the file


def download_names(path: Path, url: str | None = None, timeout: float = 30.0, instead: str = "") -> None:
    """Fetch makemore's names.txt, check its sha256 and write it atomically (a temp file, then a rename). `instead`:
    what else the command that asked could be given, for the line that says the download failed."""
    url = url or NAMES_URL
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UsageError(
            f"{path} is missing and downloading {url} failed ({reason}); "
            f"copy names.txt to {path}{instead}"
        ) from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != NAMES_SHA256:
        raise UsageError(
            f"the file downloaded from {url} has sha256 {digest[:12]}..., not {NAMES_SHA256[:12]}...; "
            f"nothing was written; copy names.txt to {path} yourself"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_words(path: str | os.PathLike) -> list[str]:
    """The words of a one-word-per-line UTF-8 file.

    Normalisation (documented in the README): any line break (LF, CRLF, CR) ends a line; a leading BOM is dropped;
    surrounding whitespace is stripped; blank lines are skipped; each word is put in Unicode NFC form. Case and
    non-ASCII letters are kept: they simply become characters of the vocabulary. Anything else is refused with a
    message naming the line.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block forever, /dev/zero fill the memory
        what = "a directory" if path.is_dir() else "not a regular file (a pipe or a device)"
        raise UsageError(f"data file {path} is {what}; pass --data.path FILE, a text file with one word per line")
    if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
        raise UsageError(
            f"data file {path} is {path.stat().st_size / 2**20:,.0f} MiB, more than a word list "
            f"(limit {MAX_FILE_BYTES // 2**20} MiB); pass --data.path FILE with one word per line"
        )
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"data file {path} does not exist; pass --data.path FILE (one word per line)") from None
    except OSError as e:
        raise UsageError(f"cannot read data file {path} ({e.strerror}); pass --data.path FILE") from None
    if b"\x00" in raw:
        raise UsageError(f"{path} looks binary (it contains NUL bytes); --data.path needs a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); re-save it as UTF-8") from None
    fast = _ascii_words(text.removeprefix("\ufeff"))
    if fast is not None:
        return fast
    words = []
    for lineno, line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        word = unicodedata.normalize("NFC", line.strip())
        if not word:
            continue
        where = f"{path}:{lineno}"
        if BOUNDARY in word:
            raise UsageError(f"{where}: {word[:40]!r} contains {BOUNDARY!r}, the boundary token; remove it")
        if len(word) > MAX_WORD_LENGTH:
            raise UsageError(
                f"{where}: a line of {len(word)} characters (limit {MAX_WORD_LENGTH}); "
                "the file must hold one word per line"
            )
        bad = next((c for c in word if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise UsageError(f"{where}: control character U+{ord(bad):04X} inside a word; remove it")
        words.append(word)
    if not words:
        raise UsageError(f"{path} holds no words (it is empty or blank); pass --data.path FILE with one word per line")
    return words


_UNWANTED_ASCII = re.compile(
    r"[\x00-\x1f\x7f" + re.escape(BOUNDARY) + "]"
)  # a control character or the boundary token, inside a word


def _ascii_words(text: str) -> list[str] | None:
    """read_words' result for a plain ASCII file, by whole-list operations (a large file's per-word loop takes
    minutes): NFC leaves ASCII as it is, so only the refusals need checking, and when one applies (or the text is not
    ASCII) this returns None and read_words' own loop finds the line and says what is wrong."""
    if not text.isascii():
        return None
    words = [word for line in text.splitlines() if (word := line.strip())]
    if not words or max(map(len, words)) > MAX_WORD_LENGTH or _UNWANTED_ASCII.search("".join(words)):
        return None
    return words


# ------------------------------------------------------------------------------------- vocabulary, windows, split


LARGE_FILE_BYTES = 32 << 20  # reading a file above this size is announced on stderr


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_memory_for(words: list[str], block_size: int, path) -> None:
    """Refuse, before building them, examples that would not fit in memory: every character (and each word's end)
    is one example of block_size + 1 int64 indices, ~32 bytes with block_size 3 (the file's text is ~1 byte each)."""
    examples = sum(len(word) + 1 for word in words)
    needed = examples * (block_size + 1) * 8 * 2  # the windows, and as much again while they are built
    available = _available_memory()
    if available is not None and needed > available:
        raise UsageError(
            f"data file {path} gives {examples:,} examples: building them needs ~{_size(needed)} of memory, "
            f"{_size(available)} is available; use a smaller --data.path file (or a smaller "
            "--data.block_size)"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def build_vocab(words: list[str]) -> str:
    """The boundary token at index 0, then the file's characters in sorted order (27 for names.txt)."""
    return BOUNDARY + "".join(sorted(set("".join(words))))


def build_windows(words: list[str], vocab: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (context, next character) pair of every word, contexts padded with the boundary token.

    Exactly the lecture's build_dataset: 'emma' with block_size 3 gives ... -> e, ..e -> m, .em -> m, emm -> a,
    mma -> '.'.
    """
    # vectorised (the same tensors as the lecture's loop, which takes minutes and ~50 bytes a character in Python
    # lists for a large file): every word and its end token in one sequence of vocabulary indices, then context
    # column k is the sequence shifted by k where the word has k earlier characters, else the boundary token 0
    text = "".join(word + BOUNDARY for word in words)
    if not text:
        return torch.empty(0, block_size, dtype=torch.long), torch.empty(0, dtype=torch.long)
    points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    del text
    codes = torch.tensor([ord(c) for c in vocab], dtype=torch.long)
    order = torch.argsort(codes)
    found = torch.searchsorted(codes[order], points).clamp_(max=len(vocab) - 1)
    if not torch.equal(codes[order][found], points):
        missing = chr(int(points[codes[order][found] != points][0]))
        raise KeyError(missing)  # (as the loop's stoi[ch] did)
    y = order[found]
    del points, found
    lengths = torch.tensor([len(word) + 1 for word in words], dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(len(y)) - torch.repeat_interleave(starts, lengths)  # index of each character in its word
    del starts, lengths
    x = torch.zeros(len(y), block_size, dtype=torch.long)
    for k in range(1, block_size + 1):
        has = pos >= k
        x[k:, block_size - k][has[k:]] = y[:-k][has[k:]]
    return x, y


def split_words(words: list[str], seed: int = 42) -> dict[str, list[str]]:
    """The lecture's split: random.seed(42); random.shuffle(words); cut at 80% and 90%."""
    words = list(words)
    random.Random(seed).shuffle(words)  # the same permutation as random.seed(seed); random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    splits = {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}
    if not all(splits.values()):
        raise UsageError(
            f"only {len(words)} words: the 80/10/10 split needs at least 10 so that train, val and test are non-empty"
        )
    return splits


# --------------------------------------------------------------------------------------------- training batches


def _stream_seed(seed: int, rank: int, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{rank}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class StepSampler:
    """Minibatch indices for optimizer step s, a pure function of (seed, rank, s).

    Like the lecture's torch.randint(0, n, (batch_size,), generator=g), but the generator is re-seeded every
    BLOCK steps from (seed, rank, block). So resuming at any step, or grouping steps into batches differently,
    draws exactly the same minibatches, and each DDP rank draws its own.
    """

    BLOCK = 100  # steps drawn from one seeding of the generator

    def __init__(self, num_examples: int, batch_size: int, seed: int, rank: int = 0):
        self.num_examples, self.batch_size, self.seed, self.rank = num_examples, batch_size, seed, rank
        self._cached: tuple[int, torch.Tensor] | None = None

    def _block(self, block: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != block:
            g = torch.Generator().manual_seed(_stream_seed(self.seed, self.rank, block))
            ix = torch.randint(0, self.num_examples, (self.BLOCK, self.batch_size), generator=g)
            self._cached = (block, ix)
        return self._cached[1]

    def indices(self, start: int, stop: int) -> torch.Tensor:
        """(stop - start, batch_size) example indices for steps start .. stop-1."""
        parts, step = [], start
        while step < stop:
            block, offset = divmod(step, self.BLOCK)
            take = min(stop - step, self.BLOCK - offset)
            parts.append(self._block(block)[offset : offset + take])
            step += take
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class TrainStream(IterableDataset):
    """One epoch of training minibatches, (x (B, T), y (B,)) for minibatches s, s+1, ... (one per optimizer step, or
    accumulate_grad_batches per step: the DataModule counts in minibatches).

    The epoch starts at the trainer's current global step (read when Lightning starts iterating, after a checkpoint
    is restored) and ends at the next multiple of steps_per_epoch, or at max_steps. Minibatch s is a pure function
    of (seed, rank, s), so a resumed run draws exactly the minibatches an uninterrupted one would.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        sampler: StepSampler,
        start_step: Callable[[], int],
        steps_per_epoch: int,
        max_steps: int,
    ):
        super().__init__()
        self.x, self.y, self.sampler, self.start_step = x, y, sampler, start_step
        self.steps_per_epoch, self.max_steps = steps_per_epoch, max_steps

    def epoch_bounds(self) -> tuple[int, int]:
        start = self.start_step()
        stop = (start // self.steps_per_epoch + 1) * self.steps_per_epoch
        if self.max_steps >= 0:
            stop = min(stop, self.max_steps)
        return start, stop

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step, stop = self.epoch_bounds()
        while step < stop:  # gathered a sampler block at a time (one indexing op per 100 steps, not two per step)
            end = min(stop, (step // self.sampler.BLOCK + 1) * self.sampler.BLOCK)
            ix = self.sampler.indices(step, end)
            xs, ys = self.x[ix], self.y[ix]
            for i in range(end - step):
                yield xs[i], ys[i]
            step = end


class EvalBatches(IterableDataset):
    """This rank's contiguous shard of a split in batches of at most batch_size, without padding or repeats (so
    the loss averaged over ranks is exactly the loss of the whole split)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        n = len(y)
        self.lo, self.hi = rank * n // world_size, (rank + 1) * n // world_size
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.lo, self.hi, self.batch_size):
            j = min(i + self.batch_size, self.hi)
            yield self.x[i:j], self.y[i:j]


# ------------------------------------------------------------------------------------------------ DataModule


class NamesDataModule(L.LightningDataModule):
    """The names dataset as the lecture builds it, served for fast training and exact evaluation."""

    def __init__(
        self,
        path: str = DEFAULT_PATH,
        block_size: int = 3,
        batch_size: int = 32,
        steps_per_epoch: int = 10_000,
        eval_batch_size: int = 32_768,
        seed: int = 2147483647,
        split_seed: int = 42,
        num_samples: int = 20,
    ):
        """
        Args:
            path: one word per line, UTF-8. The default data/names.txt is downloaded (sha256-checked) if absent.
            block_size: characters of context the model sees to predict the next one.
            batch_size: examples per optimizer step, drawn at random with replacement (the lecture's 32).
            steps_per_epoch: optimizer steps per epoch; every epoch ends with validation and a checkpoint.
            eval_batch_size: examples per batch when evaluating a whole split (the default takes val in one go).
            seed: seed of the minibatch stream (the model's init is seeded by seed_everything).
            split_seed: random.seed for shuffling the words before the 80/10/10 cut (the lecture's 42).
            num_samples: names that `predict` generates.
        """
        super().__init__()
        for name, value in [
            ("block_size", block_size),
            ("batch_size", batch_size),
            ("steps_per_epoch", steps_per_epoch),
            ("eval_batch_size", eval_batch_size),
            ("num_samples", num_samples),
        ]:
            if value < 1:
                raise UsageError(f"--data.{name} must be at least 1, got {value}")
        self.save_hyperparameters()
        self.path = Path(path)
        if not self.path.exists() and path == DEFAULT_PATH:
            download_names(self.path, instead=" or pass --data.path FILE")
        big = self.path.is_file() and self.path.stat().st_size > LARGE_FILE_BYTES
        if big:  # a large file takes a while: say what is happening
            print(f"reading {self.path} ({self.path.stat().st_size / 2**20:,.0f} MiB) ...", file=sys.stderr, flush=True)
        self.words = read_words(self.path)
        check_memory_for(self.words, block_size, self.path)
        # known at construction, so LightningCLI can link it into the model before either is built
        self.vocab = build_vocab(self.words)
        self.words_by_split = split_words(self.words, split_seed)  # now, so that too few words fails before any run
        self.block_size, self.batch_size = block_size, batch_size
        self.steps_per_epoch = steps_per_epoch
        self.eval_batch_size, self.seed, self.split_seed = eval_batch_size, seed, split_seed
        self.num_samples = num_samples
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            for name, words in self.words_by_split.items():
                self.splits[name] = build_windows(words, self.vocab, self.block_size)

    @property
    def split_sizes(self) -> dict[str, int]:
        """Examples per split after setup(): {'train': 182625, 'val': 22655, 'test': 22866} for names.txt."""
        return {name: len(y) for name, (_, y) in self.splits.items()}

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> TrainStream:
        x, y = self.splits["train"]
        rank, _ = self._rank()
        trainer = self.trainer
        # minibatches are counted in batches: with gradient accumulation an optimizer step takes several
        per_step = trainer.accumulate_grad_batches if trainer is not None else 1
        stream = TrainStream(
            x,
            y,
            self.train_sampler(len(y), rank),
            start_step=(lambda: trainer.global_step * per_step) if trainer is not None else (lambda: 0),
            steps_per_epoch=self.steps_per_epoch * per_step,
            max_steps=trainer.max_steps * per_step if trainer is not None and trainer.max_steps >= 0 else -1,
        )
        # the stream itself: it yields whole minibatches, and a DataLoader around it (batch_size=None, no workers)
        # would only add ~50 us of per-batch machinery, a few % of a step of this model on a CPU
        return stream

    def train_sampler(self, num_examples: int, rank: int) -> StepSampler:
        """Which examples minibatch s holds: minibatch s is drawn from a generator seeded by (seed, rank, s // 100),
        so each DDP rank has its own stream (a subclass may draw them otherwise: the lecture kit's notebook stream)."""
        return StepSampler(num_examples, self.batch_size, self.seed, rank)

    def _eval_dataloader(self, split: str) -> DataLoader:
        x, y = self.splits[split]
        rank, world_size = self._rank()
        return DataLoader(EvalBatches(x, y, self.eval_batch_size, rank, world_size), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        """One batch of sample numbers: predict generates that many names (seeded by --data.seed)."""
        return DataLoader([torch.arange(self.num_samples) + self.seed], batch_size=None)
