"""Matching two tokenizers: the tokens of one answer text, and the two vocabularies.

Sequences. Both tokenizers cut the same answer text; each token's character span comes from the fast
tokenizer's offset mapping. Offsets are normalised first so that every tokenizer's spans partition the text:
a token ends where its offsets end, a token that ends inside a character (byte pieces of one character,
which share that character's offsets) is grouped with the pieces that complete it, and whitespace a tokenizer
leaves out of its offsets (trimmed offsets) belongs to the token after it. The positions where both
tokenizers cut are the common cuts; between two common cuts lies one *chunk*: a run of student tokens and a
run of teacher tokens spelling exactly the same characters (1:1, one student token made of several teacher
tokens, several student tokens inside one teacher token, or many to many). A chunk is cut further where both
sides' tokens end at the same byte (the bytes each token stands for, when they spell the chunk): byte pieces
of one character that both tokenizers cut alike become 1:1 chunks. The first student token and the
first teacher token of a chunk are predicted from the same text prefix, so their next-token distributions
are comparable: those are the *pairs* the cross-tokenizer losses use. The answer's EOS is its own chunk.

Vocabularies. Tokens are matched by the bytes they stand for (byte-level BPE's printable byte alphabet,
SentencePiece's "▁" and <0xNN> byte-fallback pieces decoded), special tokens by role (EOS with EOS).
"""

from __future__ import annotations

import bisect
import itertools
import re
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TokenizedText:
    """One text cut by one tokenizer: token ids and each token's normalised character span."""

    ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]  # [start, end) in characters; pieces of one character share a span
    length: int  # characters in the text
    pieces: tuple[bytes | None, ...] | None = None  # the bytes each token stands for (`token_bytes`)

    def cuts(self) -> list[int]:
        """Positions (0 < p <= length) where a token ends a whole character run."""
        return sorted({end for _, end in self.spans if end > 0})


@dataclass(frozen=True)
class Chunk:
    """Student tokens [student_start, student_end) and teacher tokens [teacher_start, teacher_end) spelling
    the same characters [char_start, char_end), bytes [byte_start, byte_end) of the text's UTF-8 (the EOS
    chunk spells none). Chunks cut inside one character share its characters."""

    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int
    char_start: int
    char_end: int
    byte_start: int
    byte_end: int

    @property
    def student_tokens(self) -> int:
        return self.student_end - self.student_start

    @property
    def teacher_tokens(self) -> int:
        return self.teacher_end - self.teacher_start


@dataclass(frozen=True)
class AnswerAlignment:
    """Student and teacher answer tokens of one example (target tokens, then EOS on both sides), matched."""

    chunks: tuple[Chunk, ...]
    # per student answer token: the teacher answer positions covering it
    covering: tuple[tuple[int, ...], ...]
    student_tokens: int
    teacher_tokens: int

    def pairs(self) -> list[tuple[int, int]]:
        """(student position, teacher position) predicted from the same text prefix: each chunk's first
        ones."""
        return [(c.student_start, c.teacher_start) for c in self.chunks]

    def merges(self) -> list[tuple[int, range]]:
        """(student position, teacher positions) where one student token is spelled by several teacher tokens:
        the teacher's probability of the student token is the product of theirs (chain rule)."""
        return [(c.student_start, range(c.teacher_start, c.teacher_end))
                for c in self.chunks if c.student_tokens == 1 and c.teacher_tokens > 1]


def tokenize_with_spans(text: str, tokenizer: PreTrainedTokenizerBase) -> TokenizedText:
    """`text` tokenized as a target is (no special tokens), with normalised spans (see the module doc).
    ValueError for a tokenizer without offsets (a slow, Python tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__}: aligning tokenizers needs a fast tokenizer (offset "
                         "mappings); load it with use_fast=True")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    table = _token_bytes_of(tokenizer)
    ids = tuple(enc["input_ids"])
    return TokenizedText(ids=ids, spans=normalise_spans(enc["offset_mapping"], len(text)), length=len(text),
                         pieces=tuple(table[i] if i < len(table) else None for i in ids))


_TOKEN_BYTES: weakref.WeakKeyDictionary[Any, list[bytes | None]] = weakref.WeakKeyDictionary()


def _token_bytes_of(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """`token_bytes`, computed once per tokenizer object."""
    if tokenizer not in _TOKEN_BYTES:
        _TOKEN_BYTES[tokenizer] = token_bytes(tokenizer)
    return _TOKEN_BYTES[tokenizer]


def normalise_spans(offsets: list[tuple[int, int]], length: int) -> tuple[tuple[int, int], ...]:
    """Spans that partition [0, length): token i ends at its raw end when no later token starts before it
    (otherwise it is a piece of a character the next pieces complete, and shares their span); it starts
    where the previous whole run ended, so whitespace left out of the offsets joins the token after it."""
    n = len(offsets)
    if n == 0:
        return ()
    # The smallest raw start of every later token: a token whose end passes it is not a whole run yet.
    later_start = [length] * (n + 1)
    for i in range(n - 1, -1, -1):
        later_start[i] = min(later_start[i + 1], offsets[i][0])
    ends: list[int | None] = []
    last = 0
    for i, (_, end) in enumerate(offsets):
        whole = end > last and end <= later_start[i + 1]
        ends.append(end if whole else None)
        if whole:
            last = end
    ends[-1] = length  # trailing whitespace left out of the offsets belongs to the last token
    spans: list[tuple[int, int]] = []
    start, group = 0, []
    for i, end in enumerate(ends):
        group.append(i)
        if end is not None:
            end = max(end, start)
            spans.extend((start, end) for _ in group)
            start, group = end, []
    return tuple(spans)


def align_answer(text: str, student: TokenizedText, teacher: TokenizedText) -> AnswerAlignment:
    """The chunks and covering teacher positions of one answer `text` tokenized by both; each side's answer
    tokens are its target tokens then EOS (as `tasks.base.encode` makes them), and EOS pairs with EOS."""
    if student.length != len(text) or teacher.length != len(text):
        raise ValueError("align_answer: both tokenizations must be of `text`")
    common = sorted(set(student.cuts()) & set(teacher.cuts()) | {len(text)}) if text else []
    byte_at = [0]  # the UTF-8 offset of each character position
    for ch in text:
        byte_at.append(byte_at[-1] + len(ch.encode()))
    encoded = text.encode()
    chunks: list[Chunk] = []
    s_pos = t_pos = 0
    char = 0
    for cut in common:
        s_end = _tokens_up_to(student, cut, s_pos)
        t_end = _tokens_up_to(teacher, cut, t_pos)
        chunk = Chunk(s_pos, s_end, t_pos, t_end, char, cut, byte_at[char], byte_at[cut])
        chunks.extend(_split_at_common_bytes(chunk, student, teacher, encoded))
        s_pos, t_pos, char = s_end, t_end, cut
    if s_pos != len(student.ids) or t_pos != len(teacher.ids):
        raise ValueError(f"align_answer: tokens left over after the last cut of {text!r}")
    ns, nt = len(student.ids), len(teacher.ids)
    end = len(encoded)
    chunks.append(Chunk(ns, ns + 1, nt, nt + 1, len(text), len(text), end, end))  # EOS with EOS
    t_starts = [s for s, _ in teacher.spans]
    covering = []
    for s_start, s_end in student.spans:
        # Teacher tokens whose span overlaps [s_start, s_end): those starting before s_end and ending after
        # s_start (spans are sorted and partition the text).
        first = bisect.bisect_right([e for _, e in teacher.spans], s_start)
        last = bisect.bisect_left(t_starts, s_end)
        covering.append(tuple(range(first, max(last, first + 1))))
    covering.append((nt,))
    return AnswerAlignment(chunks=tuple(chunks), covering=tuple(covering), student_tokens=ns + 1,
                           teacher_tokens=nt + 1)


def _split_at_common_bytes(
    chunk: Chunk, student: TokenizedText, teacher: TokenizedText, encoded: bytes
) -> list[Chunk]:
    """`chunk` cut where both sides' tokens end at the same byte inside it (when each side's pieces spell
    its bytes; otherwise, e.g. a normalizer that adds a prefix space, it stays whole)."""
    segment = encoded[chunk.byte_start : chunk.byte_end]
    sides = []
    for tok, start, end in ((student, chunk.student_start, chunk.student_end),
                            (teacher, chunk.teacher_start, chunk.teacher_end)):
        pieces = None if tok.pieces is None else tok.pieces[start:end]
        if pieces is None or any(p is None for p in pieces) or b"".join(pieces) != segment:  # type: ignore[arg-type]
            return [chunk]
        ends = list(itertools.accumulate(len(p) for p in pieces))  # type: ignore[arg-type]
        sides.append(ends)
    s_ends, t_ends = sides
    inner = sorted(set(s_ends[:-1]) & set(t_ends[:-1]))
    if not inner:
        return [chunk]
    out = []
    s, t, b = chunk.student_start, chunk.teacher_start, 0
    for cut in [*inner, len(segment)]:
        s_next = chunk.student_start + s_ends.index(cut) + 1
        t_next = chunk.teacher_start + t_ends.index(cut) + 1
        out.append(Chunk(s, s_next, t, t_next, chunk.char_start, chunk.char_end, chunk.byte_start + b,
                         chunk.byte_start + cut))
        s, t, b = s_next, t_next, cut
    return out


def _tokens_up_to(tok: TokenizedText, cut: int, start: int) -> int:
    """The index after the last token (from `start`) whose span ends at or before `cut`."""
    i = start
    while i < len(tok.spans) and tok.spans[i][1] <= cut:
        i += 1
    return i


def align_texts(
    text: str, student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase
) -> AnswerAlignment:
    """`align_answer` of `text` tokenized by both tokenizers."""
    return align_answer(text, tokenize_with_spans(text, student), tokenize_with_spans(text, teacher))


# ---------------------------------------------------------------------------------------------------------
# vocabularies

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (byte-level BPE token text -> bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """The bytes each token id stands for (None: a special or added token, or a piece that is not text)."""
    vocab = tokenizer.get_vocab()
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    special = _special_ids(tokenizer)
    byte_level = _is_byte_level(tokenizer)
    alphabet = _byte_level_alphabet()
    for text, i in vocab.items():
        if i in special:
            continue
        if byte_level:
            if all(c in alphabet for c in text):
                out[i] = bytes(alphabet[c] for c in text)
        elif m := _BYTE_PIECE.match(text):
            out[i] = bytes([int(m.group(1), 16)])
        else:
            out[i] = text.replace("▁", " ").encode("utf-8")
    return out


@dataclass(frozen=True)
class VocabularyMap:
    """Student and teacher token ids standing for the same bytes (the matched vocabulary), one-to-one."""

    student_ids: torch.Tensor  # [M] long
    teacher_ids: torch.Tensor  # [M] long
    student_vocab: int
    teacher_vocab: int

    def teacher_to_student(self) -> torch.Tensor:
        """[teacher_vocab] student id of each teacher token (-1: unmatched)."""
        table = torch.full((self.teacher_vocab,), -1, dtype=torch.long)
        table[self.teacher_ids] = self.student_ids
        return table

    def student_matched(self) -> torch.Tensor:
        """[student_vocab] bool: whether each student token is matched."""
        mask = torch.zeros(self.student_vocab, dtype=torch.bool)
        mask[self.student_ids] = True
        return mask

    @property
    def size(self) -> int:
        return int(self.student_ids.numel())


def vocabulary_map(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> VocabularyMap:
    """The matched vocabulary: tokens of the same bytes (the first id of a byte string each side has twice),
    and EOS with EOS."""
    teacher_by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(token_bytes(teacher)):
        if b is not None:
            teacher_by_bytes.setdefault(b, i)
    pairs: dict[int, int] = {}  # student id -> teacher id
    used: set[int] = set()
    student_bytes = token_bytes(student)
    # A byte-fallback piece (<0x20>) spells what a text token (" ") may spell too: the text token, which the
    # model actually emits, gets the match.
    order = sorted(range(len(student_bytes)), key=lambda i: (_is_byte_piece(student, i), i))
    for i in order:
        b = student_bytes[i]
        t = teacher_by_bytes.get(b) if b is not None else None
        if t is not None and t not in used:
            pairs[i] = t
            used.add(t)
    # Special and added tokens by their text (<pad> with <pad>), EOS by role whatever its text.
    t_special, s_special = _special_ids(teacher), _special_ids(student)
    teacher_special = {t: i for t, i in teacher.get_vocab().items() if i in t_special}
    for text, i in student.get_vocab().items():
        t = teacher_special.get(text)
        if i in s_special and t is not None and t not in used:
            pairs[i] = t
            used.add(t)
    if student.eos_token_id is not None and teacher.eos_token_id is not None:
        pairs = {s: t for s, t in pairs.items() if t != teacher.eos_token_id}
        pairs[student.eos_token_id] = teacher.eos_token_id
    ids = sorted(pairs)
    return VocabularyMap(
        student_ids=torch.tensor(ids, dtype=torch.long),
        teacher_ids=torch.tensor([pairs[i] for i in ids], dtype=torch.long),
        student_vocab=len(student),
        teacher_vocab=len(teacher),
    )


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Special and added tokens: matched by their text, not their bytes."""
    vocab = tokenizer.get_vocab()
    added = getattr(tokenizer, "added_tokens_encoder", {})
    return set(tokenizer.all_special_ids) | {i for t, i in vocab.items() if t in added}


def _is_byte_piece(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    return bool(_BYTE_PIECE.match(tokenizer.convert_ids_to_tokens(token_id) or ""))


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers share one vocabulary (then KD needs no alignment)."""
    return a.get_vocab() == b.get_vocab()


# ---------------------------------------------------------------------------------------------------------
# a batch of aligned answers

# Batch keys of the teacher's own encoding of the gold sequences (prompt + answer in its tokenizer).
TEACHER_VIEW = "teacher_view_"
# Batch keys of the alignment (`batch_alignment`), rows indexing the student's and teacher's answer rows.
ALIGNMENT_KEYS = ("xt_pair_student", "xt_pair_teacher", "xt_merged_student", "xt_merged_first",
                  "xt_merge_rows", "xt_merge_tokens", "xt_merge_owner", "xt_student_chunk",
                  "xt_teacher_chunk")


def batch_alignment(
    alignments: list[AnswerAlignment],
    student_targets: list[list[int]],
    teacher_targets: list[list[int]],
) -> dict[str, torch.Tensor]:
    """The alignments of a batch's examples as index tensors over the batch's answer rows (row-major, as
    `scored.forward_scored` gathers them): per pair its student row and teacher row, the student token a
    chain merge spells (-1: none) and its first teacher token, and per later piece of a merge its teacher
    row, its teacher token and the pair it belongs to; per answer row of each side, its chunk (numbered over
    the batch: a chunk's number is its pair's). `*_targets`: each example's answer tokens (+ EOS)."""
    pair_s, pair_t, merged, first, m_rows, m_tokens, m_owner = [], [], [], [], [], [], []
    s_chunk: list[int] = []
    t_chunk: list[int] = []
    s_offset = t_offset = 0
    for a, s_ids, t_ids in zip(alignments, student_targets, teacher_targets, strict=True):
        if (a.student_tokens, a.teacher_tokens) != (len(s_ids), len(t_ids)):
            raise ValueError(f"alignment of {a.student_tokens}/{a.teacher_tokens} answer tokens for an "
                             f"example of {len(s_ids)}/{len(t_ids)}")
        merges = dict(a.merges())
        for c in a.chunks:
            s_chunk += [len(pair_s)] * c.student_tokens
            t_chunk += [len(pair_s)] * c.teacher_tokens
            s_pos, t_pos = c.student_start, c.teacher_start
            pieces = merges.get(s_pos)
            if pieces is not None:
                for t in pieces[1:]:
                    m_rows.append(t_offset + t)
                    m_tokens.append(t_ids[t])
                    m_owner.append(len(pair_s))
            merged.append(s_ids[s_pos] if pieces is not None else -1)
            first.append(t_ids[t_pos] if pieces is not None else -1)
            pair_s.append(s_offset + s_pos)
            pair_t.append(t_offset + t_pos)
        s_offset += len(s_ids)
        t_offset += len(t_ids)
    values = (pair_s, pair_t, merged, first, m_rows, m_tokens, m_owner, s_chunk, t_chunk)
    return {key: torch.tensor(v, dtype=torch.long) for key, v in zip(ALIGNMENT_KEYS, values, strict=True)}
