"""Data: compact token storage, token-budget batching, collation and parallel file reading."""
import gzip

import numpy as np
import pytest
import torch

from mt.data import ParallelData, TokenArray, collate, encode_parallel, read_lines, read_parallel, token_batches
from mt.errors import MTError
from mt.tokenizer import BOS, EOS, PAD


def random_seqs(n, seed=0, lo=1, hi=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 100, size=rng.integers(lo, hi)).tolist() for _ in range(n)]


def random_data(n=400, seed=0) -> ParallelData:
    return ParallelData(TokenArray.from_lists(random_seqs(n, seed)), TokenArray.from_lists(random_seqs(n, seed + 1)))


class WordTokenizer:
    """Stand-in for Tokenizer: one id per whitespace-separated word."""

    def encode(self, texts):
        return [[4 + len(w) for w in t.split()] for t in texts]


def test_token_array_round_trip_and_dtypes():
    """from_lists keeps every sequence (empty ones too) in one flat int32 array with int64 offsets."""
    seqs = random_seqs(50) + [[], [7], []]
    arr = TokenArray.from_lists(seqs)
    assert [arr[i].tolist() for i in range(len(arr))] == seqs
    assert arr.flat.dtype == np.int32 and arr.flat.ndim == 1 and len(arr.flat) == sum(map(len, seqs))
    assert arr.offsets.dtype == np.int64 and len(arr.offsets) == len(seqs) + 1
    assert arr.lengths().tolist() == [len(s) for s in seqs]
    keep = np.array([0, 3, 50, 51])
    assert [arr.select(keep)[i].tolist() for i in range(4)] == [seqs[i] for i in keep]


def test_encode_parallel_filters_and_chunks():
    """encode_parallel drops empty/over-long/badly proportioned pairs, and chunking changes nothing."""
    src = ["a b c", "", "a", "a b", "one two three four five six seven eight nine ten", "x y"]
    tgt = ["d e", "f", "", "c d", "x", "y z w"]
    whole = encode_parallel(WordTokenizer(), src, tgt, max_len=8, max_ratio=1.5)
    kept = [0, 3, 5]  # 1, 2: empty side; 4: 10 tokens > max_len
    assert [whole.src[i].tolist() for i in range(len(whole.src))] == WordTokenizer().encode([src[i] for i in kept])
    chunked = encode_parallel(WordTokenizer(), src, tgt, max_len=8, max_ratio=1.5, chunk=2)
    for a, b in ((whole.src, chunked.src), (whole.tgt, chunked.tgt)):
        assert np.array_equal(a.flat, b.flat) and np.array_equal(a.offsets, b.offsets)
    ratio = encode_parallel(WordTokenizer(), ["a"], ["a b c d e f g"], max_ratio=1.0)
    assert len(ratio.src) == 0  # 7 > 1.0 * 1 + 5


def test_token_batches_cover_every_index_once():
    """Each epoch's batches hold every sentence index exactly once."""
    data = random_data()
    for epoch in range(3):
        batches = token_batches(data.src.lengths(), data.tgt.lengths(), 300, seed=1, epoch=epoch)
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(len(data.src)))


@pytest.mark.parametrize("budget", [30, 300, 2000])
def test_token_batches_respect_budget(budget):
    """n * max(padded source, padded target) <= budget for every batch of more than one sentence."""
    data = random_data()
    batches = token_batches(data.src.lengths(), data.tgt.lengths(), budget, seed=3, epoch=0)
    for idx in batches:
        b = collate(data, idx)
        width = max(b["src"].shape[1], b["tgt_in"].shape[1])
        assert len(idx) == 1 or len(idx) * width <= budget
    if budget == 30:  # sentences longer than the budget still get a batch of their own
        assert any(len(i) == 1 and max(data.src.lengths()[i[0]], data.tgt.lengths()[i[0]]) + 1 > 30
                   for i in batches)


def test_token_batches_deterministic_in_seed_and_epoch():
    """Same (seed, epoch) gives identical batches; another epoch or seed gives another order."""
    data = random_data()
    lens = data.src.lengths(), data.tgt.lengths()

    def run(seed, epoch):
        return [b.tolist() for b in token_batches(*lens, 300, seed=seed, epoch=epoch)]

    assert run(1, 0) == run(1, 0)
    assert run(1, 0) != run(1, 1)
    assert run(1, 0) != run(2, 0)
    unshuffled = np.concatenate(token_batches(*lens, 300, seed=1, epoch=0, shuffle=False))
    assert np.all(np.diff(lens[0][unshuffled]) >= 0)  # length-sorted by source


def test_collate_layout():
    """src = x EOS PAD.., tgt_in = BOS y PAD.., tgt_out = y EOS PAD..; shapes (B, max+1)."""
    data = ParallelData(TokenArray.from_lists([[5, 6, 7], [8]]), TokenArray.from_lists([[9], [10, 11, 12, 13]]))
    b = collate(data, np.array([1, 0]))
    assert b["src"].tolist() == [[8, EOS, PAD, PAD], [5, 6, 7, EOS]]
    assert b["tgt_in"].tolist() == [[BOS, 10, 11, 12, 13], [BOS, 9, PAD, PAD, PAD]]
    assert b["tgt_out"].tolist() == [[10, 11, 12, 13, EOS], [9, EOS, PAD, PAD, PAD]]
    assert all(t.dtype == torch.int64 for t in b.values())


def write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def test_read_parallel_gz_and_limit(tmp_path):
    """PREFIX.LANG.gz files are read as pairs by line number; limit keeps the first N."""
    write_gz(tmp_path / "c.en.gz", ["a dog", "", "two cats"])
    write_gz(tmp_path / "c.de.gz", ["ein Hund", "", "zwei Katzen"])
    assert read_parallel(str(tmp_path / "c"), "en", "de") == (["a dog", "", "two cats"], ["ein Hund", "", "zwei Katzen"])
    assert read_parallel(str(tmp_path / "c"), "en", "de", limit=1) == (["a dog"], ["ein Hund"])


def test_read_shared_multi30k(multi30k_dir):
    """The shared Multi30K validation split reads as 1,014 aligned pairs."""
    src, tgt = read_parallel(str(multi30k_dir / "val"), "en", "de")
    assert len(src) == len(tgt) == 1014 and all(src) and all(tgt)


def test_read_parallel_line_count_mismatch(tmp_path):
    """Files with different line counts are an MTError naming both files and counts."""
    write_gz(tmp_path / "c.en.gz", ["a", "b", "c"])
    write_gz(tmp_path / "c.de.gz", ["a", "b"])
    with pytest.raises(MTError, match=r"c\.en\.gz has 3 lines but .*c\.de\.gz has 2"):
        read_parallel(str(tmp_path / "c"), "en", "de")
    with pytest.raises(MTError, match="not found"):
        read_parallel(str(tmp_path / "c"), "en", "fr")


def test_read_lines_crlf_and_bad_bytes(tmp_path):
    """read_lines strips CR/LF line ends and turns invalid UTF-8 into U+FFFD."""
    (tmp_path / "t.txt").write_bytes(b"one\r\ntw\xffo\n\nlast")
    assert list(read_lines(tmp_path / "t.txt")) == ["one", "tw\ufffdo", "", "last"]


def test_capped_lines_cut_long_lines_and_keep_the_count():
    import io

    from mt.data import capped_lines

    text = "short\n" + "x" * 10_000 + "\nä" * 3 + "\n" + "y" * 25 + "\r\nlast"
    cut = []
    lines = list(capped_lines(io.StringIO(text), limit=20, on_cut=lambda n, length: cut.append((n, length))))
    assert lines == ["short", "x" * 20, "ä", "ä", "ä", "y" * 20, "last"]
    assert cut == [(2, 10_000), (6, 25)]
    assert list(capped_lines(io.StringIO("a" * 20 + "\n" + "b" * 21), limit=20, on_cut=lambda *a: None)) == ["a" * 20, "b" * 20]


def test_reading_a_huge_line_takes_bounded_memory(tmp_path):
    """A 20 MB line read with the default cap allocates a few times the cap, not the line."""
    import tracemalloc

    from mt.data import MAX_LINE_CHARS

    path = tmp_path / "huge.txt"
    path.write_text("dog " * 5_000_000 + "\nok\n")
    tracemalloc.start()
    lines = list(read_lines(path, on_cut=lambda *a: None))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [len(line) for line in lines] == [MAX_LINE_CHARS, 2]
    assert peak < 4 * (1 << 20) + 8 * MAX_LINE_CHARS, peak  # the 1 MiB pieces the rest is skipped in, and the kept head
