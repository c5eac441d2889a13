"""Token alignment between two tokenizers (kdlab.alignment): answer chunks, covering positions, pairs, chain
merges and the matched vocabulary, on the hard cases: leading spaces, merges across word boundaries,
byte-fallback pieces, unicode, one-to-many both ways."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from kdlab.alignment import (
    align_answer,
    align_texts,
    normalise_spans,
    token_bytes,
    tokenize_with_spans,
    vocabulary_map,
)
from kdlab.tiny import build_tiny_tokenizer

HARD_TEXTS = [
    " positive",
    "the film is a good film.",
    " the  is a",  # leading space, a double space, a token spanning two words ("is a")
    "café naïve",  # two-byte characters: byte-fallback pieces on one side, byte-level pieces on the other
    "日本 😀!",  # three- and four-byte characters
    "a",
    "  ",
    "",
]


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-like BPE without pre-tokenization: merges cross word boundaries ("the ", "is a") and
    characters outside its alphabet fall back to <0xNN> byte pieces."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz .,!?":
        vocab.setdefault(c, len(vocab))
    merges = [("i", "s"), ("is", " "), ("is ", "a"), ("t", "h"), ("th", "e"), ("the", " "), ("f", "i"),
              ("fi", "l"), ("fil", "m"), ("g", "o"), ("go", "o"), ("goo", "d"), ("p", "o"), ("po", "s")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.ByteFallback()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    return {"bpe512": build_tiny_tokenizer(512), "bpe300": build_tiny_tokenizer(300),
            "fallback": byte_fallback_tokenizer()}


def spelled(tokenizer: PreTrainedTokenizerFast, ids: tuple[int, ...]) -> bytes:
    pieces = token_bytes(tokenizer)
    return b"".join(pieces[i] or b"?" for i in ids)


@pytest.mark.parametrize("student", ["bpe512", "bpe300", "fallback"])
@pytest.mark.parametrize("teacher", ["bpe512", "bpe300", "fallback"])
@pytest.mark.parametrize("text", HARD_TEXTS)
def test_chunks_spell_the_same_text_on_both_sides(tokenizers, student, teacher, text) -> None:
    s, t = tokenizers[student], tokenizers[teacher]
    s_tok, t_tok = tokenize_with_spans(text, s), tokenize_with_spans(text, t)
    a = align_answer(text, s_tok, t_tok)
    # The chunks partition both sides' answer tokens (target + EOS) and the text's bytes, in order.
    first = a.chunks[0]
    assert (first.student_start, first.teacher_start, first.char_start, first.byte_start) == (0, 0, 0, 0)
    for prev, nxt in zip(a.chunks, a.chunks[1:], strict=False):
        assert (prev.student_end, prev.teacher_end, prev.byte_end) == (
            nxt.student_start, nxt.teacher_start, nxt.byte_start)
        # Characters too, except between the pieces of one character (they share it).
        assert prev.char_end == nxt.char_start or (prev.char_start, prev.char_end) == (
            nxt.char_start, nxt.char_end)
    last = a.chunks[-1]
    assert (last.student_end, last.teacher_end) == (len(s_tok.ids) + 1, len(t_tok.ids) + 1)
    assert last.char_end == len(text) and last.student_tokens == last.teacher_tokens == 1  # EOS with EOS
    assert last.byte_start == last.byte_end == len(text.encode())
    # Every chunk's student tokens and teacher tokens spell exactly its bytes, and lie in its characters.
    for c in a.chunks[:-1]:
        segment = text.encode()[c.byte_start : c.byte_end]
        assert c.student_tokens >= 1 and c.teacher_tokens >= 1 and segment
        assert segment in text[c.char_start : c.char_end].encode()
        assert spelled(s, s_tok.ids[c.student_start : c.student_end]) == segment
        assert spelled(t, t_tok.ids[c.teacher_start : c.teacher_end]) == segment
    # Every answer character is covered: each student token's covering teacher tokens spell a text that
    # contains the student token's own span.
    assert len(a.covering) == len(s_tok.ids) + 1
    for j, (start, end) in enumerate(s_tok.spans):
        cover = a.covering[j]
        assert cover == tuple(range(cover[0], cover[-1] + 1))
        assert t_tok.spans[cover[0]][0] <= start and t_tok.spans[cover[-1]][1] >= end


def test_leading_space_one_teacher_token_covers_five_student_tokens(tokenizers) -> None:
    a = align_texts(" positive", tokenizers["bpe300"], tokenizers["bpe512"])
    # bpe300: "Ġ" "p" "os" "i" "tive"; bpe512: "Ġpositive": one chunk of 5:1, then EOS.
    assert [(c.student_tokens, c.teacher_tokens) for c in a.chunks] == [(5, 1), (1, 1)]
    assert a.covering == ((0,), (0,), (0,), (0,), (0,), (1,))
    assert a.pairs() == [(0, 0), (5, 1)]
    assert a.merges() == []
    # The reverse: one student token spelled by five teacher tokens is a chain merge.
    b = align_texts(" positive", tokenizers["bpe512"], tokenizers["bpe300"])
    assert b.merges() == [(0, range(0, 5))]
    assert b.covering == ((0, 1, 2, 3, 4), (5,))


def test_merge_across_a_word_boundary(tokenizers) -> None:
    s, t = tokenizers["fallback"], tokenizers["bpe512"]
    text = "the film is a good"
    a = align_texts(text, s, t)
    s_tok, t_tok = tokenize_with_spans(text, s), tokenize_with_spans(text, t)
    assert s.convert_ids_to_tokens(list(s_tok.ids))[:2] == ["the ", "film"]
    # "the " + "film" against "the" + "Ġfilm": no common cut after "the" or "the ": one 2:2 chunk.
    assert (a.chunks[0].char_start, a.chunks[0].char_end) == (0, 8)
    assert (a.chunks[0].student_tokens, a.chunks[0].teacher_tokens) == (2, 2)
    # "is a" (one fallback token over two words) against "Ġis" "Ġa": covered by both.
    j = s.convert_ids_to_tokens(list(s_tok.ids)).index("is a")
    assert [t.convert_ids_to_tokens([t_tok.ids[i]])[0] for i in a.covering[j]] == ["Ġis", "Ġa"]


def test_byte_fallback_pieces_are_grouped(tokenizers) -> None:
    s, t = tokenizers["fallback"], tokenizers["bpe512"]
    text = "é😀"
    s_tok = tokenize_with_spans(text, s)
    pieces = ["<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert s.convert_ids_to_tokens(list(s_tok.ids)) == pieces
    # The pieces of one character share its span: no cut falls inside a character.
    assert s_tok.spans == ((0, 1), (0, 1), (1, 2), (1, 2), (1, 2), (1, 2))
    a = align_texts(text, s, t)
    # Byte-level BPE cuts these characters into the same byte pieces: each piece pairs with its twin.
    assert [(c.char_start, c.char_end) for c in a.chunks] == [(0, 1)] * 2 + [(1, 2)] * 4 + [(2, 2)]
    assert [(c.byte_start, c.byte_end) for c in a.chunks] == [(i, i + 1) for i in range(6)] + [(6, 6)]
    assert a.pairs() == [(i, i) for i in range(7)]


def test_normalised_spans_partition_the_text() -> None:
    # Trimmed offsets (the space before "b" left out) and a zero-width piece: the spans still partition.
    assert normalise_spans([(0, 1), (2, 3)], 3) == ((0, 1), (1, 3))
    assert normalise_spans([(0, 0), (0, 2)], 2) == ((0, 2), (0, 2))
    assert normalise_spans([(0, 2)], 4) == ((0, 4),)  # trailing whitespace joins the last token
    assert normalise_spans([], 0) == ()


def test_vocabulary_map_matches_by_bytes(tokenizers) -> None:
    s, t = tokenizers["fallback"], tokenizers["bpe512"]
    m = vocabulary_map(s, t)
    s_bytes, t_bytes = token_bytes(s), token_bytes(t)
    pairs = dict(zip(m.student_ids.tolist(), m.teacher_ids.tolist(), strict=True))
    assert pairs[s.eos_token_id] == t.eos_token_id
    # "the " (fallback) is b"the "; byte-level "the" is b"the"; " " is "Ġ": all matched by their bytes.
    assert t_bytes[pairs[s.convert_tokens_to_ids("the")]] == b"the"
    assert t_bytes[pairs[s.convert_tokens_to_ids(" ")]] == b" "
    assert pairs[s.convert_tokens_to_ids("<0xC3>")] == t.convert_tokens_to_ids("Ã")
    for si, ti in pairs.items():
        if si != s.eos_token_id:
            assert s_bytes[si] == t_bytes[ti]
    assert len(set(pairs.values())) == len(pairs)  # one-to-one
    assert s.convert_tokens_to_ids("is a") not in pairs  # no byte-level token spells "is a"
    # The same tokenizer on both sides: every token matched to itself.
    same = vocabulary_map(t, t)
    assert same.size == len(t)  # special tokens too, by their text
    assert bool((same.student_ids == same.teacher_ids).all())


def test_slow_tokenizer_is_refused() -> None:
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        tokenize_with_spans("x", Slow())  # type: ignore[arg-type]


def test_batch_alignment_indexes_the_batch_rows(tokenizers) -> None:
    """Two examples: pairs and merge pieces index the batch's answer rows (row-major, target + EOS per
    example), the merged student token and the pieces' teacher tokens are read from the answers."""
    from kdlab.alignment import batch_alignment

    s, t = tokenizers["bpe512"], tokenizers["bpe300"]
    texts = [" positive", " film"]
    aligns = [align_texts(x, s, t) for x in texts]
    s_ids = [[*s(x, add_special_tokens=False)["input_ids"], s.eos_token_id] for x in texts]
    t_ids = [[*t(x, add_special_tokens=False)["input_ids"], t.eos_token_id] for x in texts]
    assert [len(i) for i in s_ids] == [2, 2] and [len(i) for i in t_ids] == [6, 4]  # "Ġfi" "l" "m"
    b = batch_alignment(aligns, s_ids, t_ids)
    assert b["xt_pair_student"].tolist() == [0, 1, 2, 3]
    assert b["xt_pair_teacher"].tolist() == [0, 5, 6, 9]
    assert b["xt_merged_student"].tolist() == [s_ids[0][0], -1, s_ids[1][0], -1]
    assert b["xt_merged_first"].tolist() == [t_ids[0][0], -1, t_ids[1][0], -1]
    assert b["xt_merge_rows"].tolist() == [1, 2, 3, 4, 7, 8]  # the later pieces only, offset by example
    assert b["xt_merge_tokens"].tolist() == [*t_ids[0][1:5], *t_ids[1][1:3]]
    assert b["xt_merge_owner"].tolist() == [0, 0, 0, 0, 2, 2]
    # Each answer row's chunk, numbered over the batch (a chunk per pair; EOS its own).
    assert b["xt_student_chunk"].tolist() == [0, 1, 2, 3]
    assert b["xt_teacher_chunk"].tolist() == [0, 0, 0, 0, 0, 1, 2, 2, 2, 3]
    with pytest.raises(ValueError, match="answer tokens"):
        batch_alignment(aligns, s_ids, [t_ids[0], t_ids[1][:-1]])


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style SentencePiece BPE: "▁" for spaces, one prepended to the text, byte-fallback pieces."""
    from tokenizers import pre_tokenizers, trainers

    from kdlab.tiny import _CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>", *pieces],
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


# ASCII: this tokenizer's byte pieces are added tokens (its trainer adds them so), unlike a real Llama's.
@pytest.mark.parametrize("text", [t for t in HARD_TEXTS if t and t.isascii()])
def test_a_prepended_space_is_aligned_with_the_text_it_precedes(tokenizers, text) -> None:
    """A tokenizer that prepends "▁" to the text spells one byte more than the text in its first chunk; the
    chunks still partition both sides and the text, and the other chunks spell their bytes exactly."""
    s, t = metaspace_tokenizer(), tokenizers["bpe512"]
    s_tok, t_tok = tokenize_with_spans(text, s), tokenize_with_spans(text, t)
    a = align_answer(text, s_tok, t_tok)
    assert [c.student_end for c in a.chunks[:-1]][-1] == len(s_tok.ids)
    assert [c.teacher_end for c in a.chunks[:-1]][-1] == len(t_tok.ids)
    for c in a.chunks[:-1]:
        segment = text.encode()[c.byte_start : c.byte_end]
        student = spelled(s, s_tok.ids[c.student_start : c.student_end])
        assert spelled(t, t_tok.ids[c.teacher_start : c.teacher_end]) == segment
        assert student == segment or (c.student_start == 0 and student == b" " + segment)
