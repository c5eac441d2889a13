"""Logit distillation across tokenizers: pure tensor functions over aligned (student row, teacher row) pairs
(`alignment.AnswerAlignment.pairs`), the teacher given over its own vocabulary.

The teacher of each pair is a *head*: some of its tokens with their log-probabilities at temperature T
(normalised over the whole teacher vocabulary) and `tail`, the log of the tempered mass of every other token.
A live teacher is the full head (every token listed, tail -inf, so both losses are exact); a cached one is its
top-k with the exact tail (`TeacherCache`), and then everything the loss needs of the unlisted tokens is
their total mass.

ULD (Boizard et al.): the student's and the teacher's probabilities, each sorted in decreasing order, the
shorter vector padded with zeros, compared by L1 (the Wasserstein-1 distance of ULD with its uniform cost):
    uld = Σ_i |sort(p_S)_i − sort(p_T)_i|.
With a head of h listed tokens the comparison is over the first h sorted entries, then the student's
remaining mass against the tail's (a lower bound of the full distance, equal to it for a full head).

Hybrid (after TRL's GOLD): the matched vocabulary (`alignment.VocabularyMap`: tokens of the same bytes) is
compared exactly and the rest by ULD:
    hybrid = MATCHED_WEIGHT · D(q_T ‖ p_S over the matched tokens + one bucket for the rest)
           + UNMATCHED_WEIGHT · uld(unmatched probabilities of each side, not renormalised)
(with a cached head, the uld part compares the listed unmatched entries only: its tail holds matched and
unmatched tokens alike, and the rest bucket of D already compares that mass)
D is the run's divergence (forward KL, ...). When one student token is spelled by several teacher tokens
t_1..t_n (`alignment.AnswerAlignment.merges`), the teacher's probability of it is the chain-rule product
p_T(t_1)·p_T(t_2 | t_1)·...·p_T(t_n | ...) and counts as matched for that row; that mass is taken out of t_1's
own entry, so the teacher's row still sums to 1. With one tokenizer on both sides every token is matched,
the rest buckets are empty and hybrid is exactly the divergence of ordinary KD.

When every student token of a row is matched (a student vocabulary inside the teacher's), the student has
no rest to put the teacher's unmatched mass in: D then compares the matched part alone (the teacher
renormalised over it) and that mass shows in the uld term only.

Both are multiplied by T² (as every kd1 divergence) and summed over pairs / `num_tokens`.

Hidden states (kd3): each side's states are averaged over the tokens of each chunk (`pool_by_chunk`), and
every student answer token is compared through its chunk's two averages, so a chunk weighs as many student
tokens as it holds (with one tokenizer every chunk is one token: plain kd3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses import _check_common, _divergence_rows, _normalise

MATCHED_WEIGHT = 1.0  # hybrid: the exact divergence on the matched vocabulary (+ the rest's bucket)
UNMATCHED_WEIGHT = 1.0  # hybrid: ULD between the unmatched tokens' probabilities (the shape of the rest)

CHAIN_FLOOR = 1e-6  # hybrid: the smallest share of a first piece's mass left to the piece itself

_NumTokens = int | float | Tensor


def full_head(teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """A live teacher as a head: every token listed (indices [N, V], tempered log-probs [N, V]), tail -inf."""
    n, vocab = teacher_logits.shape
    logp = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    idx = torch.arange(vocab, device=logp.device).expand(n, vocab)
    return idx, logp, torch.full((n,), float("-inf"), device=logp.device)


def cached_head(
    topk_indices: Tensor, topk_logprobs: Tensor, tail_lse: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """A cached teacher (top-k log-probs at T = 1, `tail_lse` = logsumexp of the others' logp / T) as a head
    normalised at temperature T."""
    scaled = topk_logprobs.detach().float() / temperature
    tail = tail_lse.detach().float()
    norm = torch.logaddexp(torch.logsumexp(scaled, dim=-1), tail)
    return topk_indices.long(), scaled - norm.unsqueeze(-1), tail - norm


def head_token_logprob(head_indices: Tensor, head_logprobs: Tensor, tokens: Tensor) -> Tensor:
    """log p_T of `tokens` [N] read from the head (-inf where a token is not listed)."""
    hit = head_indices == tokens.unsqueeze(-1)
    return head_logprobs.masked_fill(~hit, float("-inf")).logsumexp(dim=-1)


def _sorted_l1(
    a: Tensor, b_head: Tensor, b_count: Tensor, b_tail: Tensor, remainder: Tensor | None = None
) -> Tensor:
    """Per row Σ_{i<h} |sort(a)_i − sort(b)_i| + |Σ_{i>=h} sort(a)_i − b_tail| (h = b_count, the listed
    entries of b; sorts decreasing, zeros pad the shorter one); the second term only in the rows
    `remainder` marks (default: every row)."""
    width = max(a.shape[-1], b_head.shape[-1])
    a = F.pad(a, (0, width - a.shape[-1]))
    b = F.pad(b_head, (0, width - b_head.shape[-1]))
    a_sorted = a.sort(dim=-1, descending=True).values
    b_sorted = b.sort(dim=-1, descending=True).values
    listed = torch.arange(width, device=a.device) < b_count.unsqueeze(-1)
    head = ((a_sorted - b_sorted).abs() * listed).sum(dim=-1)
    rest = (a_sorted * ~listed).sum(dim=-1)
    tail_term = (rest - b_tail).abs()
    return head + (tail_term if remainder is None else tail_term * remainder)


def uld_loss(
    student_logits: Tensor,
    head_indices: Tensor,
    head_logprobs: Tensor,
    tail: Tensor,
    *,
    temperature: float,
    num_tokens: _NumTokens,
) -> Tensor:
    """T²·Σ_rows uld / num_tokens (module doc). `student_logits` [N, V_S] and the teacher head [N, h] of the
    same N pairs; the two vocabularies may differ in size and order."""
    _check_rows(student_logits, head_indices, head_logprobs, tail)
    p_student = F.log_softmax(student_logits.float() / temperature, dim=-1).exp()  # as `full_head` does
    p_teacher = head_logprobs.float().exp()
    count = torch.full((p_student.shape[0],), head_indices.shape[-1], device=p_student.device)
    per_row = _sorted_l1(p_student, p_teacher, count, tail.float().exp())
    return _normalise(per_row.sum() * temperature**2, num_tokens)


def hybrid_loss(
    student_logits: Tensor,
    head_indices: Tensor,
    head_logprobs: Tensor,
    tail: Tensor,
    *,
    teacher_to_student: Tensor,
    student_matched: Tensor,
    merged_student_token: Tensor | None = None,
    merged_first_piece: Tensor | None = None,
    merged_rest_logprob: Tensor | None = None,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    num_tokens: _NumTokens,
) -> Tensor:
    """T²·Σ_rows (MATCHED_WEIGHT·D + UNMATCHED_WEIGHT·uld of the rest) / num_tokens (module doc).

    Args:
        student_logits: [N, V_S]; the teacher head [N, h] (`full_head`, `cached_head`) of the same pairs.
        teacher_to_student: [V_T] long, the student id of each matched teacher token, -1 otherwise.
        student_matched: [V_S] bool, the student tokens matched (`VocabularyMap.student_matched`).
        merged_student_token: [N] long, the student token a row's chunk spells with several teacher tokens
            (-1: none); merged_first_piece [N] its first teacher token, merged_rest_logprob [N] the sum of the
            later pieces' tempered log-probs (each at its own teacher row).
        temperature, divergence, beta, alpha: as in `losses.kd_divergence_full`.
    """
    _check_common(temperature, divergence, beta, alpha)
    _check_rows(student_logits, head_indices, head_logprobs, tail)
    n, vocab = student_logits.shape
    device = student_logits.device
    idx = head_indices.long()
    t_logp = head_logprobs.detach().float()
    t_tail = tail.detach().float()
    table = teacher_to_student.to(device)
    # A live teacher (`full_head`: every token in id order, one broadcast row) is mapped by columns, so no
    # [N, V_T] index tensor is built; a cached head is mapped entry by entry.
    full_vocab = idx.stride(0) == 0 and idx.shape[-1] == table.shape[0]
    matched = student_matched.to(device).expand(n, vocab).clone()

    # The chain-rule entry: p(t_1)·r moves from t_1's own entry to the merged student token.
    merged_logp = None
    if merged_student_token is not None:
        assert merged_first_piece is not None and merged_rest_logprob is not None
        has = merged_student_token >= 0
        first = head_token_logprob(idx, t_logp, merged_first_piece.clamp(min=0))
        merged_logp = (first + merged_rest_logprob.float()).masked_fill(~has, float("-inf"))
        has = has & torch.isfinite(merged_logp)  # a first piece outside a cached head: no chain entry
        merged_logp = merged_logp.masked_fill(~has, float("-inf"))
        # log(p(t_1) − p(t_1)·r) = log p(t_1) + log(1 − r); t_1 keeps at least a CHAIN_FLOOR share of its
        # mass: a teacher sure of the later pieces (r rounds to 1) leaves no zero for reverse KL to divide by.
        r = merged_rest_logprob.float().exp().clamp(max=1.0 - CHAIN_FLOOR)
        left = t_logp + torch.log1p(-r).unsqueeze(-1)
        is_first = has.unsqueeze(-1) & (idx == merged_first_piece.unsqueeze(-1))
        t_logp = torch.where(is_first, left, t_logp)
        rows = has.nonzero().squeeze(-1)
        matched[rows, merged_student_token[rows]] = True

    # Teacher over the student's vocabulary: the listed matched entries (one-to-one, so a scatter), the
    # chain entries added; everything else falls in the rest.
    if full_vocab:
        listed_matched = (table >= 0).expand(n, -1)
        t_ids = (table >= 0).nonzero().squeeze(-1)
        dense = torch.full((n, vocab), float("-inf"), device=device)
        dense[:, table[t_ids]] = t_logp[:, t_ids]
    else:
        to_student = table[idx]  # [N, h] student id of each listed teacher token
        listed_matched = to_student >= 0
        column = torch.where(listed_matched, to_student, torch.full_like(to_student, vocab))  # vocab: dropped
        dense = torch.full((n, vocab + 1), float("-inf"), device=device)
        dense.scatter_(1, column, t_logp.masked_fill(~listed_matched, float("-inf")))
        dense = dense[:, :vocab]
    if merged_logp is not None:
        rows = (merged_logp > float("-inf")).nonzero().squeeze(-1)
        cols = merged_student_token[rows]
        dense[rows, cols] = torch.logaddexp(dense[rows, cols], merged_logp[rows])
    # A matched student token listed by no teacher entry lies in the teacher's tail (its mass is not known
    # apart from the tail's): it joins the rest on both sides.
    known = matched & ((dense > float("-inf")) | torch.isneginf(t_tail).unsqueeze(-1))
    unmatched_teacher = t_logp.masked_fill(listed_matched, float("-inf"))
    t_rest = torch.logaddexp(unmatched_teacher.logsumexp(dim=-1), t_tail)
    t_buckets = torch.cat([dense.masked_fill(~known, float("-inf")), t_rest.unsqueeze(-1)], dim=-1)

    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_rest = s.masked_fill(known, float("-inf")).logsumexp(dim=-1)
    # A row whose every student token is compared one by one has no rest to put the teacher's unmatched
    # mass in (KL would be infinite): there D compares the matched part alone, the teacher renormalised
    # over it, and the uld part below sees the teacher's unmatched mass.
    no_rest = known.all(dim=-1)
    t_buckets[:, -1] = t_buckets[:, -1].masked_fill(no_rest, float("-inf"))
    s_buckets = torch.cat([s.masked_fill(~known, float("-inf")), s_rest.unsqueeze(-1)], dim=-1)
    # Both sides' buckets are normalised already; the log_softmax only removes rounding.
    matched_part = _divergence_rows(F.log_softmax(t_buckets, dim=-1), F.log_softmax(s_buckets, dim=-1),
                                    divergence, beta, alpha)

    # ULD on what is left: the teacher's unmatched listed entries against the student's unmatched tokens. A
    # full head lists them all (the student's surplus is compared with zeros); a cached head's tail mixes
    # matched and unmatched tokens, so beyond its listed entries only the rest bucket above compares them.
    unmatched_count = (~listed_matched & (t_logp > float("-inf"))).sum(dim=-1)
    full = torch.isneginf(t_tail)
    rest_part = _sorted_l1(s.exp().masked_fill(matched, 0.0), unmatched_teacher.exp(), unmatched_count,
                           torch.zeros_like(t_tail), remainder=full)
    per_row = MATCHED_WEIGHT * matched_part + UNMATCHED_WEIGHT * rest_part
    return _normalise(per_row.sum() * temperature**2, num_tokens)


def pool_by_chunk(hidden: Tensor, chunk: Tensor, num_chunks: int) -> Tensor:
    """[num_chunks, d]: the mean of `hidden`'s rows [N, d] in each chunk (`chunk` [N]: each row's chunk)."""
    sums = torch.zeros(num_chunks, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    sums = sums.index_add(0, chunk, hidden)
    ones = torch.ones(chunk.shape[0], dtype=hidden.dtype, device=hidden.device)
    counts = torch.zeros(num_chunks, dtype=hidden.dtype, device=hidden.device).index_add(0, chunk, ones)
    return sums / counts.clamp(min=1).unsqueeze(-1)


def chunk_logprobs_at_last_rows(
    teacher_logprobs: Tensor, teacher_chunk: Tensor, student_chunk: Tensor
) -> Tensor:
    """[N_S]: each chunk's summed teacher log-prob ([N_T] per teacher row, `teacher_chunk` its chunk) at
    the chunk's last student row (`student_chunk` [N_S], rows in order), 0 at the chunk's other rows."""
    chunks = int(max(teacher_chunk.max(), student_chunk.max())) + 1 if student_chunk.numel() else 0
    per_chunk = torch.zeros(chunks, dtype=teacher_logprobs.dtype, device=teacher_logprobs.device)
    per_chunk = per_chunk.index_add(0, teacher_chunk, teacher_logprobs)
    rows = torch.arange(student_chunk.numel(), device=student_chunk.device)
    last = torch.full((chunks,), -1, dtype=torch.long, device=student_chunk.device)
    last = last.scatter_reduce(0, student_chunk, rows, reduce="amax")
    out = torch.zeros(student_chunk.numel(), dtype=teacher_logprobs.dtype, device=teacher_logprobs.device)
    out[last] = per_chunk
    return out


def _check_rows(student_logits: Tensor, head_indices: Tensor, head_logprobs: Tensor, tail: Tensor) -> None:
    if student_logits.ndim != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    n = student_logits.shape[0]
    if head_indices.shape != head_logprobs.shape or head_indices.ndim != 2 or head_indices.shape[0] != n:
        raise ValueError(f"the teacher head must be [N, h] indices and log-probs with N = {n} rows, got "
                         f"{tuple(head_indices.shape)} and {tuple(head_logprobs.shape)}")
    if tail.shape != (n,):
        raise ValueError(f"tail must be [N] = [{n}], got {tuple(tail.shape)}")
