"""The names data: vocabulary, windows, the lecture's split, the step-indexed minibatch stream, eval shards."""

import pytest
import torch

from mm_lightning.data import (
    EvalBatches,
    NamesDataModule,
    StepSampler,
    TrainStream,
    build_vocab,
    build_windows,
    read_words,
    split_words,
)
from mm_lightning.examples import Corpus, Examples, build_examples, compact_dtype


def test_names_split_sizes_vocab_and_first_windows(names_file):
    dm = NamesDataModule(path=str(names_file))
    assert dm.vocab == ".abcdefghijklmnopqrstuvwxyz" and dm.vocab_size == 27  # known before setup()
    dm.setup()
    assert dm.split_sizes == {"train": 182625, "val": 22655, "test": 22866}  # the lecture's numbers
    assert len(dm.words) == 32033


def test_windows_are_the_lectures(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("emma\nava\n")
    words = read_words(path)
    vocab = build_vocab(words)
    assert vocab == ".aemv"
    x, y = build_windows(["emma"], vocab, block_size=3)
    decode = lambda row: "".join(vocab[i] for i in row)  # noqa: E731
    assert [decode(r) for r in x.tolist()] == ["...", "..e", ".em", "emm", "mma"]
    assert decode(y.tolist()) == "emma."
    x1, _ = build_windows(["ava"], vocab, block_size=1)
    assert [decode(r) for r in x1.tolist()] == [".", "a", "v", "a"]
    x2, y2 = build_windows(["", "ma", ""], vocab, block_size=2)  # an empty word: one example, '..' -> '.'
    assert [decode(r) for r in x2.tolist()] == ["..", "..", ".m", "ma", ".."] and decode(y2.tolist()) == ".ma.."


def test_split_is_random_seed_42_shuffle_then_80_10_10():
    import random

    words = [f"w{i}" for i in range(100)]
    expected = list(words)
    random.seed(42)
    random.shuffle(expected)
    splits = split_words(words)
    assert splits["train"] == expected[:80] and splits["val"] == expected[80:90] and splits["test"] == expected[90:]


def test_step_sampler_is_a_pure_function_of_the_step():
    a = StepSampler(1000, 8, seed=1)
    whole = a.indices(0, 350)
    b = StepSampler(1000, 8, seed=1)  # a fresh sampler (as after a restart), asked in odd pieces
    pieces = torch.cat([b.indices(0, 7), b.indices(7, 100), b.indices(100, 101), b.indices(101, 350)])
    assert torch.equal(whole, pieces)
    assert whole.shape == (350, 8) and whole.min() >= 0 and whole.max() < 1000
    assert not torch.equal(whole, StepSampler(1000, 8, seed=1, rank=1).indices(0, 350))  # ranks draw differently
    assert not torch.equal(whole, StepSampler(1000, 8, seed=2).indices(0, 350))


def _examples(words: list[str], block_size: int = 3) -> Examples:
    corpus = Corpus.of(words, build_vocab(words))
    return build_examples(corpus, torch.arange(len(corpus)), block_size)


SOME = ["emma", "olivia", "ava", "isabella", "sophia", "charlotte", "mia", "amelia", "harper", "evelyn"]


def test_train_stream_yields_step_s_minibatch_from_the_trainer_step_to_the_epoch_end():
    examples = _examples(SOME)
    x, y = build_windows(SOME, build_vocab(SOME), 3)
    sampler = StepSampler(len(y), 4, 0)
    batches = list(TrainStream(examples, sampler, lambda: 130, steps_per_epoch=200, max_steps=-1))
    assert len(batches) == 70  # steps 130 .. 199: the epoch ends at the next multiple of 200
    for step, (bx, by) in zip(range(130, 200), batches):
        ix = StepSampler(len(y), 4, 0).indices(step, step + 1)[0]  # a fresh sampler: a pure function of the step
        assert torch.equal(bx, x[ix]) and torch.equal(by, y[ix])
    capped = list(TrainStream(examples, sampler, lambda: 0, steps_per_epoch=200, max_steps=120))
    assert len(capped) == 120


def test_eval_batches_cover_every_example_once_across_ranks():
    examples = _examples(SOME)
    x, y = build_windows(SOME, build_vocab(SOME), 3)
    batches = [b for r in range(3) for b in EvalBatches(examples, batch_size=10, rank=r, world_size=3)]
    assert torch.equal(torch.cat([b[0] for b in batches]), x) and torch.equal(torch.cat([b[1] for b in batches]), y)


def _lecture_dataset(words: list[str], stoi: dict[str, int], block_size: int = 3):
    """makemore_part3_bn.ipynb's build_dataset, written out as the notebook has it: int64 (X, Y)."""
    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(X), torch.tensor(Y)


def test_examples_are_stored_compactly_and_batches_are_the_lectures(names_file):
    """The stored examples are uint8 (27 characters), ~2 bytes an example where the lecture's int64 tensors take
    32; the minibatches fit draws and the evaluation batches are the lecture's own tensors, indexed."""
    import random

    words = open(names_file).read().splitlines()  # the notebook's cells 2-5, independently of mm_lightning
    chars = sorted(set("".join(words)))
    stoi = {s: i + 1 for i, s in enumerate(chars)} | {".": 0}
    random.seed(42)
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    lecture = {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}
    lecture = {name: _lecture_dataset(split, stoi) for name, split in lecture.items()}

    dm = NamesDataModule(path=str(names_file), eval_batch_size=10_000)
    dm.setup()
    for name, (X, Y) in lecture.items():
        examples = dm.splits[name]
        assert examples.stream.dtype == torch.uint8 and len(examples) == len(Y)
        # 1 byte an example, and block_size padding + an int32 index a word: 1.98 bytes an example for names.txt
        assert examples.nbytes <= 2.0 * len(Y), (name, examples.nbytes / len(Y))
        assert X.dtype == Y.dtype == torch.int64 and X.nbytes + Y.nbytes == 32 * len(Y)
        x, y = examples.tensors()
        assert x.dtype == y.dtype == torch.int64 and torch.equal(x, X) and torch.equal(y, Y)
    Xtr, Ytr = lecture["train"]
    sampler = StepSampler(len(Ytr), dm.batch_size, dm.seed)  # steps 0 .. 249: across two sampler blocks
    for step, (x, y) in zip(range(250), dm.train_dataloader()):
        ix = sampler.indices(step, step + 1)[0]
        assert x.dtype == y.dtype == torch.int64 and torch.equal(x, Xtr[ix]) and torch.equal(y, Ytr[ix])
    Xdev, Ydev = lecture["val"]
    batches = list(dm.val_dataloader())
    assert len(batches) == 3  # 22655 examples, 10000 at a time
    assert torch.equal(torch.cat([x for x, _ in batches]), Xdev)
    assert torch.equal(torch.cat([y for _, y in batches]), Ydev)


def test_a_vocabulary_over_256_characters_is_stored_in_int16():
    words = ["".join(chr(0x100 + i + j) for j in range(5)) for i in range(0, 300, 3)]  # 302 characters
    vocab = build_vocab(words)
    assert len(vocab) > 256 and compact_dtype(len(vocab)) == torch.int16 and compact_dtype(40_000) == torch.int32
    examples = _examples(words)
    assert examples.stream.dtype == torch.int16
    stoi = {c: i for i, c in enumerate(vocab)}
    X, Y = _lecture_dataset(words, stoi)
    x, y = examples.tensors()
    assert torch.equal(x, X) and torch.equal(y, Y) and int(y.max()) > 255


def test_default_path_is_downloaded_when_missing(tmp_path, monkeypatch, names_file):
    """A real HTTP download from a local server: written atomically, sha256 checked."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    (served / "names.txt").write_bytes(names_file.read_bytes())
    (served / "bad.txt").write_text("not the names\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        from mm_lightning import data
        from mm_lightning.errors import UsageError

        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(data, "NAMES_URL", f"{base}/bad.txt")
        with pytest.raises(UsageError, match="sha256"):
            NamesDataModule()
        assert not (tmp_path / "data" / "names.txt").exists()
        monkeypatch.setattr(data, "NAMES_URL", f"{base}/names.txt")
        dm = NamesDataModule()
        assert (tmp_path / "data" / "names.txt").read_bytes() == names_file.read_bytes()
        assert dm.vocab_size == 27
        assert not list((tmp_path / "data").glob(".*tmp"))
    finally:
        server.shutdown()


def test_download_failure_says_where_to_put_the_file(tmp_path, monkeypatch):
    from mm_lightning import data
    from mm_lightning.errors import UsageError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "NAMES_URL", "http://127.0.0.1:9/names.txt")  # nothing listens on port 9
    with pytest.raises(UsageError, match=r"data/names.txt is missing and downloading .* failed .*--data.path"):
        NamesDataModule()


def test_the_download_commands_failure_names_only_what_it_takes(tmp_path, monkeypatch, capsys):
    """Offline, `download` says where to copy the file, and no option of another command (it has no --data.path)."""
    from mm_lightning import data
    from mm_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "NAMES_URL", "http://127.0.0.1:9/names.txt")  # nothing listens on port 9
    assert main(["download"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data/names.txt is missing and downloading"), err
    assert err[0].endswith("copy names.txt to data/names.txt") and "--data.path" not in err[0], err
    assert not (tmp_path / "data" / "names.txt").exists()
