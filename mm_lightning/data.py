"""Names data: reading and checking the file, the vocabulary, the lecture's context windows and 80/10/10 split,
and the DataModule that serves training minibatches and whole-split evaluation batches."""

from __future__ import annotations

import contextlib
import hashlib
import os
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
from mm_lightning.examples import Corpus, Examples, build_examples, memory_needed, split_order

BOUNDARY = "."  # token 0: pads the context before a word and marks its end
DEFAULT_PATH = "data/names.txt"
NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
MAX_WORD_LENGTH = 1000  # longer lines are not words: the file is probably not one-word-per-line
MAX_FILE_BYTES = 1 << 30  # 1 GiB: names.txt is 228 kB; below it every example index fits in int32 (examples.py)


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
    """The words of a one-word-per-line UTF-8 file, as read_corpus reads them."""
    return read_corpus(path).words()


def read_corpus(path: str | os.PathLike) -> Corpus:
    """The words of a one-word-per-line UTF-8 file, encoded over their vocabulary (build_vocab).

    Normalisation (documented in the README): any line break (LF, CRLF, CR) ends a line; a leading BOM is dropped;
    surrounding whitespace is stripped; blank lines are skipped; each word is put in Unicode NFC form. Case and
    non-ASCII letters are kept: they simply become characters of the vocabulary. Anything else is refused with a
    message naming the line. A file over LARGE_FILE_BYTES is announced on stderr before the long work.
    """
    path = Path(path)
    raw = _read_file(path)
    if len(raw) > LARGE_FILE_BYTES:  # a large file takes a while: say what is happening
        lines = raw.count(b"\n") or raw.count(b"\r")
        print(f"reading {path} ({len(raw) / 2**20:,.0f} MiB, {lines:,} lines) ...", file=sys.stderr, flush=True)
    corpus = _ascii_corpus(raw)
    if corpus is None:
        words = _line_loop(raw, path)
        del raw
        corpus = Corpus.of(words, build_vocab(words))
    return corpus


def _read_file(path: Path) -> bytearray:
    if path.exists() and not path.is_file():  # a FIFO would block forever, /dev/zero fill the memory
        what = "a directory" if path.is_dir() else "not a regular file (a pipe or a device)"
        raise UsageError(f"data file {path} is {what}; pass --data.path FILE, a text file with one word per line")
    if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
        raise UsageError(
            f"data file {path} is {path.stat().st_size / 2**20:,.0f} MiB, more than a word list "
            f"(limit {MAX_FILE_BYTES // 2**20} MiB); pass --data.path FILE with one word per line"
        )
    try:
        with open(path, "rb") as f:  # into one buffer: _ascii_corpus works on it in place
            raw = bytearray(os.fstat(f.fileno()).st_size)
            del raw[f.readinto(raw) :]  # (a file that shrank meanwhile)
    except FileNotFoundError:
        raise UsageError(f"data file {path} does not exist; pass --data.path FILE (one word per line)") from None
    except OSError as e:
        raise UsageError(f"cannot read data file {path} ({e.strerror}); pass --data.path FILE") from None
    return raw


def _line_loop(raw: bytearray, path: Path) -> list[str]:
    """read_corpus' words, line by line: any file, every normalisation, a refusal naming the line (~60 bytes of
    Python objects a word: a large file of plain words goes through _ascii_corpus instead)."""
    if b"\x00" in raw:
        raise UsageError(f"{path} looks binary (it contains NUL bytes); --data.path needs a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); re-save it as UTF-8") from None
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


_PLAIN = frozenset(range(0x20, 0x7F)) - {ord(BOUNDARY)}  # printable ASCII but the boundary token
_BREAKS = b"\n\r"


def _ascii_corpus(raw: bytearray) -> Corpus | None:
    """read_corpus' result for a file of plain words, by whole-array operations on its bytes: ~1 byte a character
    and 4 a word (the per-line loop's Python strings take ~60 a word, ~9x a names file's size, and minutes).

    Plain: printable ASCII words (NFC leaves them as they are), one a line (LF, CRLF or CR), no space around them.
    For anything else (non-ASCII text, something to strip, refuse or report) this returns None, and read_corpus's
    per-line loop normalises the file or names the line that is wrong."""
    if not raw:
        return None
    data = torch.frombuffer(raw, dtype=torch.uint8)
    present = torch.bincount(data, minlength=256).nonzero().squeeze(1).tolist()
    chars = [b for b in present if b not in _BREAKS]
    if not chars or not _PLAIN.issuperset(chars):
        return None
    if raw[:1] == b" " or raw[-1:] == b" " or any(s in raw for s in (b" \n", b"\n ", b" \r", b"\r ")):
        return None  # spaces around a word: the loop strips them
    is_break = data == _BREAKS[0]
    is_break |= data == _BREAKS[1]
    ends = torch.nonzero(is_break).squeeze(1).int()  # where each line ends (int32: the file is under 2 GiB)
    del is_break
    last = [] if raw.endswith(b"\n") or raw.endswith(b"\r") else [len(raw)]  # a last line without a break
    lengths = torch.diff(ends, prepend=torch.tensor([-1], dtype=torch.int32), append=torch.tensor(last).int())
    del ends
    lengths.sub_(1)
    lengths = lengths[lengths > 0]  # blank lines (and CRLF's second break) hold no word
    if lengths.max() > MAX_WORD_LENGTH:
        return None
    table = bytearray(256)  # byte -> vocabulary index: the boundary token is 0, then the sorted characters
    for index, byte in enumerate(chars, start=1):
        table[byte] = index
    tokens = torch.frombuffer(raw.translate(table, _BREAKS), dtype=torch.uint8)  # one pass: mapped, breaks dropped
    return Corpus(BOUNDARY + "".join(map(chr, chars)), tokens, lengths)


# ------------------------------------------------------------------------------------- vocabulary, windows, split


LARGE_FILE_BYTES = 32 << 20  # reading a file above this size is announced on stderr


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_memory_for(corpus: Corpus, block_size: int, path) -> None:
    """Refuse, before building them, examples that would not fit in memory (mm_lightning.examples: ~1 byte an
    example and block_size + 8 a word, with int64 temporaries while they are built). Large files say how much."""
    stored, needed = memory_needed(corpus, block_size)
    if corpus.num_examples > LARGE_FILE_BYTES:  # as many as the file has bytes: say what happens next
        print(
            f"{path}: {len(corpus):,} words, {corpus.num_examples:,} examples; splitting and storing them "
            f"({_size(stored)}) ...",
            file=sys.stderr,
            flush=True,
        )
    available = _available_memory()
    if available is not None and needed > available:
        raise UsageError(
            f"data file {path} gives {corpus.num_examples:,} examples: building them needs ~{_size(needed)} of "
            f"memory, {_size(available)} is available; use a smaller --data.path file"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def build_vocab(words: list[str]) -> str:
    """The boundary token at index 0, then the file's characters in sorted order (27 for names.txt)."""
    return BOUNDARY + "".join(sorted(set("".join(words))))


def build_windows(words: list[str], vocab: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (context, next character) pair of every word, contexts padded with the boundary token, as int64.

    Exactly the lecture's build_dataset: 'emma' with block_size 3 gives ... -> e, ..e -> m, .em -> m, emm -> a,
    mma -> '.'. (Built through the compact storage the DataModule keeps, mm_lightning.examples.)
    """
    corpus = Corpus.of(words, vocab)
    return build_examples(corpus, torch.arange(len(corpus)), block_size).tensors()


def split_words(words: list[str], seed: int = 42) -> dict[str, list[str]]:
    """The lecture's split: random.seed(42); random.shuffle(words); cut at 80% and 90%."""
    return {name: [words[i] for i in ix.tolist()] for name, ix in split_indices(len(words), seed).items()}


def split_indices(num_words: int, seed: int = 42) -> dict[str, torch.Tensor]:
    """split_words' split as word indices (mm_lightning.examples.split_order), refused when a split is empty."""
    splits = split_order(num_words, seed)
    if not all(len(ix) for ix in splits.values()):
        raise UsageError(
            f"only {num_words} words: the 80/10/10 split needs at least 10 so that train, val and test are non-empty"
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
        examples: Examples,
        sampler: StepSampler,
        start_step: Callable[[], int],
        steps_per_epoch: int,
        max_steps: int,
    ):
        super().__init__()
        self.examples, self.sampler, self.start_step = examples, sampler, start_step
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
            xs, ys = self.examples.gather(ix)  # widened to int64 here, a block at a time
            for i in range(end - step):
                yield xs[i], ys[i]
            step = end


class EvalBatches(IterableDataset):
    """This rank's contiguous shard of a split in batches of at most batch_size, without padding or repeats (so
    the loss averaged over ranks is exactly the loss of the whole split)."""

    def __init__(self, examples: Examples, batch_size: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        n = len(examples)
        self.lo, self.hi = rank * n // world_size, (rank + 1) * n // world_size
        self.examples, self.batch_size = examples, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.lo, self.hi, self.batch_size):
            yield self.examples.slice(i, min(i + self.batch_size, self.hi))


# ------------------------------------------------------------------------------------------------ DataModule


@contextlib.contextmanager
def _memory_for_data(path: Path) -> Iterator[None]:
    """Running out of memory while reading a names file or storing its examples is the file's doing: say so
    (the CLI's generic line would advise a smaller batch size, which changes nothing here)."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e):
            raise
        size = f" ({path.stat().st_size / 2**20:,.0f} MiB)" if path.is_file() else ""
        raise UsageError(
            f"out of memory reading data file {path}{size} and storing its examples; "
            "use a smaller --data.path file (or free memory)"
        ) from None


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
        with _memory_for_data(self.path):
            self.corpus = read_corpus(self.path)
            check_memory_for(self.corpus, block_size, self.path)
            # now, so that too few words fails before any run
            self.words_by_split = split_indices(len(self.corpus), split_seed)
        # known at construction, so LightningCLI can link it into the model before either is built
        self.vocab = self.corpus.vocab
        self.block_size, self.batch_size = block_size, batch_size
        self.steps_per_epoch = steps_per_epoch
        self.eval_batch_size, self.seed, self.split_seed = eval_batch_size, seed, split_seed
        self.num_samples = num_samples
        self.splits: dict[str, Examples] = {}  # after setup(); Examples.tensors() gives a split's int64 (X, Y)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def words(self) -> list[str]:
        """The file's words as strings (~60 bytes a word in Python: for small files)."""
        return self.corpus.words()

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            with _memory_for_data(self.path):
                for name, words in self.words_by_split.items():
                    self.splits[name] = build_examples(self.corpus, words, self.block_size)

    @property
    def split_sizes(self) -> dict[str, int]:
        """Examples per split after setup(): {'train': 182625, 'val': 22655, 'test': 22866} for names.txt."""
        return {name: len(examples) for name, examples in self.splits.items()}

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> TrainStream:
        examples = self.splits["train"]
        rank, _ = self._rank()
        trainer = self.trainer
        # minibatches are counted in batches: with gradient accumulation an optimizer step takes several
        per_step = trainer.accumulate_grad_batches if trainer is not None else 1
        stream = TrainStream(
            examples,
            self.train_sampler(len(examples), rank),
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
        rank, world_size = self._rank()
        return DataLoader(EvalBatches(self.splits[split], self.eval_batch_size, rank, world_size), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        """One batch of sample numbers: predict generates that many names (seeded by --data.seed)."""
        return DataLoader([torch.arange(self.num_samples) + self.seed], batch_size=None)
