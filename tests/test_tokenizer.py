"""mt.tokenizer: SentencePiece training with mt's special ids, batched encode/decode, casing, sampling."""
import pytest

from mt.errors import MTError
from mt.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, train_tokenizer

TEXT = ["A man rides a red bike.", "Two dogs play in the snow.", "A girl reads a book in the park.",
        "The children run on the beach.", "A woman sings a song.", "An old man walks his dog."] * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXT, tmp_path_factory.mktemp("spm") / "spm.model", vocab_size=80)


def test_special_ids_and_round_trip(tok):
    assert (tok.sp.pad_id(), tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id()) == (PAD, UNK, BOS, EOS)
    assert len(tok) == 80
    ids = tok.encode(TEXT[:6])
    assert all(ids) and all(min(seq) > EOS for seq in ids)           # no specials inside a sentence
    assert tok.decode(ids) == TEXT[:6]
    assert tok.decode([[BOS] + ids[0] + [EOS, PAD]]) == [TEXT[0]]     # specials are not text


def test_one_by_one_and_as_a_list_give_the_same_ids(tok):
    many = TEXT[:100]                                                  # the list path (a thread pool)
    assert tok.encode(many) == [tok.encode([t])[0] for t in many]


def test_lowercase_tokenizer_ignores_case(tok):
    lower = Tokenizer(tok.path, lowercase=True)
    assert lower.encode(["A MAN Rides"]) == tok.encode(["a man rides"])
    assert not lower.same_as(tok) and tok.same_as(Tokenizer(tok.path))


def test_sampled_segmentation_is_seeded(tok):
    text = TEXT[:20]
    a, b = tok.encode(text, alpha=0.5, seed=1), tok.encode(text, alpha=0.5, seed=1)
    assert a == b and tok.decode(a) == text
    assert a != tok.encode(text) or a != tok.encode(text, alpha=0.5, seed=2)  # a sample, not the best split


def test_bad_model_files_are_one_line_errors(tmp_path):
    with pytest.raises(MTError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(MTError, match="not a valid SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")
