"""Cross-tokenizer losses (kdlab.cross_tokenizer) against an independent float64 computation at vocabularies
of >= 32,000 tokens (teacher and student of different sizes), and their identities: student = teacher gives
0, and hybrid with one tokenizer on both sides is ordinary KD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlab import losses
from kdlab.cross_tokenizer import (
    MATCHED_WEIGHT,
    UNMATCHED_WEIGHT,
    cached_head,
    full_head,
    head_token_logprob,
    hybrid_loss,
    uld_loss,
)

V_S, V_T = 32_000, 33_280  # student and teacher vocabularies (different sizes)
T = 2.0


def softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sorted_l1_64(a: np.ndarray, b: np.ndarray) -> float:
    n = max(len(a), len(b))
    a = np.sort(np.pad(a, (0, n - len(a))))[::-1]
    b = np.sort(np.pad(b, (0, n - len(b))))[::-1]
    return float(np.abs(a - b).sum())


def logits(n: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("sizes", [(V_S, V_T), (V_T, V_S)])
def test_uld_full_teacher_matches_float64(sizes) -> None:
    vs, vt = sizes
    s, t = logits(4, vs, 0), logits(4, vt, 1)
    got = uld_loss(s, *full_head(t, T), temperature=T, num_tokens=3)
    ps, pt = softmax64(s.numpy() / T), softmax64(t.numpy() / T)
    want = T**2 * sum(sorted_l1_64(ps[i], pt[i]) for i in range(4)) / 3
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(want, rel=2e-5)


def test_uld_cached_top_k_matches_float64() -> None:
    s, t = logits(3, V_S, 2), logits(3, V_T, 3)
    k = 64
    logp1 = torch.log_softmax(t, dim=-1)
    top = logp1.topk(k, dim=-1)
    rest = logp1.scatter(1, top.indices, float("-inf"))
    tail_lse = torch.logsumexp(rest / T, dim=-1)  # what the cache stores at temperature T
    got = uld_loss(s, *cached_head(top.indices, top.values, tail_lse, T), temperature=T, num_tokens=1)
    ps, pt = softmax64(s.numpy() / T), softmax64(t.numpy() / T)
    want = 0.0
    for i in range(3):
        a = np.sort(ps[i])[::-1]
        b = np.sort(pt[i])[::-1][:k]
        want += np.abs(a[:k] - b).sum() + abs(a[k:].sum() - (1 - b.sum()))
    assert float(got) == pytest.approx(T**2 * want, rel=2e-5)


def test_cached_head_over_every_token_is_the_live_head() -> None:
    t = logits(2, 500, 4)
    logp1 = torch.log_softmax(t, dim=-1)
    idx = logp1.argsort(dim=-1, descending=True)
    cached = cached_head(idx, logp1.gather(1, idx), torch.full((2,), float("-inf")), T)
    live = full_head(t, T)
    torch.testing.assert_close(cached[1].gather(1, idx.argsort(dim=-1)), live[1], rtol=0, atol=1e-5)
    s = logits(2, 400, 5)
    torch.testing.assert_close(uld_loss(s, *cached, temperature=T, num_tokens=1),
                               uld_loss(s, *live, temperature=T, num_tokens=1), rtol=1e-5, atol=1e-6)


def test_uld_is_zero_for_the_same_distribution_and_sorts() -> None:
    t = logits(3, V_S, 6)
    assert float(uld_loss(t, *full_head(t, T), temperature=T, num_tokens=1)) == pytest.approx(0, abs=1e-6)
    # A permuted vocabulary has the same sorted probabilities: ULD ignores token identity.
    perm = torch.randperm(V_S, generator=torch.Generator().manual_seed(0))
    assert float(uld_loss(t[:, perm], *full_head(t, T), temperature=T, num_tokens=1)) == pytest.approx(
        0, abs=1e-6)
    assert float(uld_loss(t, *full_head(logits(3, V_S, 7), T), temperature=T, num_tokens=1)) > 0.1


def random_map(seed: int, matched: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s_ids = torch.randperm(V_S, generator=g)[:matched]
    t_ids = torch.randperm(V_T, generator=g)[:matched]
    table = torch.full((V_T,), -1, dtype=torch.long)
    table[t_ids] = s_ids
    mask = torch.zeros(V_S, dtype=torch.bool)
    mask[s_ids] = True
    return table, mask


def hybrid64(s, t, table, mask, merged, first, rest_logp, divergence="forward_kl") -> float:
    """The hybrid loss of one batch, row by row in float64 from its definition."""
    ps, pt = softmax64(s.numpy() / T), softmax64(t.numpy() / T)
    table, mask = table.numpy(), mask.numpy()
    total = 0.0
    for i in range(len(ps)):
        p_t = pt[i].copy()
        q = np.zeros(V_S)
        in_a = mask.copy()
        if merged[i] >= 0:
            chain = p_t[first[i]] * np.exp(float(rest_logp[i]))
            p_t[first[i]] -= chain
            q[merged[i]] += chain
            in_a[merged[i]] = True
        t_matched = table >= 0
        q[table[t_matched]] += p_t[t_matched]
        rest_t = p_t[~t_matched].sum()
        rest_s = ps[i][~in_a].sum()
        p_a, q_a = ps[i][in_a], q[in_a]
        buckets_t = np.append(q_a, rest_t)
        buckets_s = np.append(p_a, rest_s)
        if in_a.all():  # no student token left for the rest: the matched part alone, teacher renormalised
            buckets_t, buckets_s = q_a / q_a.sum(), p_a
        if divergence == "forward_kl":
            pos = buckets_t > 0
            d = float((buckets_t[pos] * np.log(buckets_t[pos] / buckets_s[pos])).sum())
        else:  # reverse_kl
            pos = buckets_s > 0
            d = float((buckets_s[pos] * np.log(buckets_s[pos] / buckets_t[pos])).sum())
        uld = sorted_l1_64(ps[i][~in_a], p_t[~t_matched])
        total += MATCHED_WEIGHT * d + UNMATCHED_WEIGHT * uld
    return T**2 * total


@pytest.mark.parametrize("matched", [20_000, V_S])  # V_S: every student token matched, no student rest
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_hybrid_matches_float64(divergence, matched) -> None:
    n = 4
    s, t = logits(n, V_S, 10), logits(n, V_T, 11)
    table, mask = random_map(0, matched)
    matched_s = torch.nonzero(mask).squeeze(1)
    unmatched_s = torch.nonzero(~mask).squeeze(1)
    matched_t = torch.nonzero(table >= 0).squeeze(1)
    unmatched_t = torch.nonzero(table < 0).squeeze(1)
    # Row 0: no merge; row 1: an unmatched student token spelled by a matched first piece and more; row 2: a
    # matched student token by an unmatched first piece; row 3: first piece maps to the merged token itself.
    spelled = int(unmatched_s[5]) if len(unmatched_s) else int(matched_s[5])
    merged = torch.tensor([-1, spelled, int(matched_s[7]), int(table[matched_t[9]])])
    first = torch.tensor([-1, int(matched_t[3]), int(unmatched_t[4]), int(matched_t[9])])
    rest_logp = torch.tensor([0.0, -0.7, -0.2, -1.5])
    # First pieces the teacher finds likely, so their share of the mass weighs in the loss.
    t[torch.arange(1, n), first[1:]] += 15.0
    t[2, int((table == merged[2]).nonzero())] += 14.0  # and the teacher's own token of row 2's merged one
    got = hybrid_loss(
        s, *full_head(t, T), teacher_to_student=table, student_matched=mask, merged_student_token=merged,
        merged_first_piece=first, merged_rest_logprob=rest_logp, temperature=T, divergence=divergence,
        num_tokens=1)
    want = hybrid64(s, t, table, mask, merged.tolist(), first.tolist(), rest_logp.tolist(), divergence)
    assert np.isfinite(want) and float(got) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
def test_hybrid_with_one_tokenizer_is_ordinary_kd(divergence) -> None:
    s, t = logits(5, V_S, 20), logits(5, V_S, 21)
    identity = torch.arange(V_S)
    common = dict(temperature=T, divergence=divergence, num_tokens=4)
    got = hybrid_loss(s, *full_head(t, T), teacher_to_student=identity,
                      student_matched=torch.ones(V_S, dtype=torch.bool), **common)
    torch.testing.assert_close(got, losses.kd_divergence_full(s, t, **common), rtol=1e-5, atol=1e-7)
    # The same with a cached top-k teacher: ordinary KD over the top-k and its tail bucket.
    logp1 = torch.log_softmax(t, dim=-1)
    top = logp1.topk(32, dim=-1)
    tail = torch.logsumexp(logp1.scatter(1, top.indices, float("-inf")) / T, dim=-1)
    got = hybrid_loss(s, *cached_head(top.indices, top.values, tail, T), teacher_to_student=identity,
                      student_matched=torch.ones(V_S, dtype=torch.bool), **common)
    want = losses.kd_divergence_topk(s, top.indices, top.values, tail_lse=tail, **common)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_hybrid_is_zero_when_the_student_is_the_teacher() -> None:
    t = logits(3, V_S, 30)
    identity = torch.arange(V_S)
    got = hybrid_loss(t, *full_head(t, T), teacher_to_student=identity,
                      student_matched=torch.ones(V_S, dtype=torch.bool), temperature=T, num_tokens=1)
    assert float(got) == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
@pytest.mark.parametrize("matched", [200, 300])  # 300: every student token matched
@pytest.mark.parametrize("rest", [-1.0, 0.0])  # 0.0: the teacher sure of the later pieces of a merge
def test_hybrid_loss_and_gradient_are_finite(divergence, matched, rest) -> None:
    s = logits(2, 300, 40).requires_grad_(True)
    t = logits(2, 350, 41)
    table = torch.full((350,), -1, dtype=torch.long)
    table[:matched] = torch.arange(matched)
    mask = torch.zeros(300, dtype=torch.bool)
    mask[:matched] = True
    loss = hybrid_loss(s, *full_head(t, T), teacher_to_student=table, student_matched=mask,
                       merged_student_token=torch.tensor([250, -1]), merged_first_piece=torch.tensor([3, -1]),
                       merged_rest_logprob=torch.tensor([rest, 0.0]), temperature=T, divergence=divergence,
                       num_tokens=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_head_token_logprob_reads_listed_tokens_only() -> None:
    idx = torch.tensor([[4, 2, 9]])
    lp = torch.tensor([[-0.1, -2.0, -3.0]])
    assert head_token_logprob(idx, lp, torch.tensor([2])).item() == pytest.approx(-2.0)
    assert head_token_logprob(idx, lp, torch.tensor([5])).item() == float("-inf")


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="tail must be"):
        uld_loss(torch.zeros(2, 5), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(3),
                 temperature=1.0, num_tokens=1)
    with pytest.raises(ValueError, match="divergence must be one of"):
        hybrid_loss(torch.zeros(1, 5), *full_head(torch.zeros(1, 5), 1.0), teacher_to_student=torch.arange(5),
                    student_matched=torch.ones(5, dtype=torch.bool), temperature=1.0, divergence="kl",
                    num_tokens=1)


def test_teacher_batch_merges_pieces_by_the_chain_rule() -> None:
    """Two examples: A, student ["a", EOS] and teacher ["a", EOS]; B, student ["ab", EOS] and teacher
    ["a", "b", EOS] (a 1:2 merge). The pairs read the teacher rows of their own positions, and the teacher's
    probability of "ab" is p(a at B's row 0)·p(b at B's row 1): checked against hybrid_loss given those rows
    and that product by hand, and against a wrong product."""
    from kdlab.alignment import VocabularyMap
    from kdlab.methods import TeacherBatch

    # Student vocab: 0 "ab", 1 "a", 2 EOS; teacher vocab: 0 "a", 1 "b", 2 EOS, 3 "c".
    vocab = VocabularyMap(student_ids=torch.tensor([1, 2]), teacher_ids=torch.tensor([0, 2]), student_vocab=3,
                          teacher_vocab=4)
    alignment = {  # student rows A0 A1 B0 B1, teacher rows A0 A1 B0 B1 B2
        "xt_pair_student": torch.tensor([0, 1, 2, 3]), "xt_pair_teacher": torch.tensor([0, 1, 2, 4]),
        "xt_merged_student": torch.tensor([-1, -1, 0, -1]), "xt_merged_first": torch.tensor([-1, -1, 0, -1]),
        "xt_merge_rows": torch.tensor([3]), "xt_merge_tokens": torch.tensor([1]),
        "xt_merge_owner": torch.tensor([2]),
    }
    teacher_logits = logits(5, 4, 50)
    student_logits = logits(4, 3, 51)
    teacher = TeacherBatch(logits=teacher_logits, alignment=alignment, vocabulary=vocab)
    got = teacher.divergence(student_logits, temperature=T, divergence="forward_kl", num_tokens=4,
                             cross_tokenizer="hybrid")
    rest = torch.log_softmax(teacher_logits[3] / T, dim=-1)[1]  # log p(b | a) at B's second teacher row
    common = dict(teacher_to_student=vocab.teacher_to_student(), student_matched=vocab.student_matched(),
                  merged_student_token=torch.tensor([-1, -1, 0, -1]),
                  merged_first_piece=torch.tensor([-1, -1, 0, -1]), temperature=T, num_tokens=4)
    head = full_head(teacher_logits[[0, 1, 2, 4]], T)
    want = hybrid_loss(student_logits, *head, merged_rest_logprob=torch.stack(
        [torch.tensor(0.0), torch.tensor(0.0), rest, torch.tensor(0.0)]), **common)
    wrong = hybrid_loss(student_logits, *head, merged_rest_logprob=torch.zeros(4), **common)
    torch.testing.assert_close(got, want)
    assert abs(float(want) - float(wrong)) > 1e-3
    uld = teacher.divergence(student_logits, temperature=T, divergence="forward_kl", num_tokens=4,
                             cross_tokenizer="uld")
    torch.testing.assert_close(uld, uld_loss(student_logits, *head, temperature=T, num_tokens=4))


def test_pool_by_chunk_averages_each_chunks_rows() -> None:
    from kdlab.cross_tokenizer import pool_by_chunk

    hidden = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 9.0]], requires_grad=True)
    pooled = pool_by_chunk(hidden, torch.tensor([0, 0, 2, 1]), 3)
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0], [7.0, 9.0], [5.0, 6.0]]))
    pooled.sum().backward()
    torch.testing.assert_close(hidden.grad, torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 1.0], [1.0, 1.0]]))


def test_kd3_pools_each_side_over_its_own_chunk_rows() -> None:
    """Chunk 0: student rows 0, 1 and teacher row 0; chunk 1: student row 2 and teacher rows 1-3. Every
    student row is compared through its chunk's two averages."""
    from kdlab.methods.kd3 import pooled_by_chunk

    hs = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    ht = torch.tensor([[9.0, 9.0], [1.0, 1.0], [2.0, 4.0], [3.0, 7.0]])
    alignment = {"xt_student_chunk": torch.tensor([0, 0, 1]), "xt_teacher_chunk": torch.tensor([0, 1, 1, 1]),
                 "xt_pair_student": torch.tensor([0, 2])}
    (s,), (t,) = pooled_by_chunk([hs], [ht], alignment)
    torch.testing.assert_close(s, torch.tensor([[2.0, 1.0], [2.0, 1.0], [5.0, 5.0]]))
    torch.testing.assert_close(t, torch.tensor([[9.0, 9.0], [9.0, 9.0], [2.0, 4.0]]))


def test_hybrid_maps_a_live_head_by_columns_as_a_listed_one_by_entries() -> None:
    """The live teacher's head is one broadcast row of token ids (mapped by columns); the same head with its
    ids listed row by row (mapped entry by entry, as a cached head is) gives the same loss."""
    s, t = logits(3, 2_000, 60), logits(3, 2_500, 61)
    table = torch.full((2_500,), -1, dtype=torch.long)
    students = torch.randperm(2_000, generator=torch.Generator().manual_seed(1))[:1_200]
    table[torch.arange(0, 2_500, 2)[:1_200]] = students
    mask = torch.zeros(2_000, dtype=torch.bool)
    mask[table[table >= 0]] = True
    idx, lp, tail = full_head(t, T)
    assert idx.stride(0) == 0
    common = dict(teacher_to_student=table, student_matched=mask,
                  merged_student_token=torch.tensor([5, -1, 7]), merged_first_piece=torch.tensor([0, -1, 1]),
                  merged_rest_logprob=torch.tensor([-0.5, 0.0, -1.0]), temperature=T, num_tokens=3)
    live = hybrid_loss(s, idx, lp, tail, **common)
    listed = hybrid_loss(s, idx.clone(), lp, tail, **common)
    torch.testing.assert_close(live, listed)


def test_teacher_scores_each_chunks_text_at_its_last_student_token() -> None:
    """opd across tokenizers: chunk 0 = student rows 0, 1 / teacher row 0; chunk 1 = student row 2 / teacher
    rows 1, 2. The teacher's log-prob of each chunk's text (its own tokens' sum) lands on the chunk's last
    student row, so a sample's sum is the teacher's log-prob of its text."""
    from kdlab.cross_tokenizer import chunk_logprobs_at_last_rows
    from kdlab.methods import TeacherBatch

    got = chunk_logprobs_at_last_rows(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([0, 1, 1]),
                                      torch.tensor([0, 0, 1]))
    torch.testing.assert_close(got, torch.tensor([0.0, -1.0, -2.5]))
    teacher_logits = logits(3, 6, 70)
    targets = torch.tensor([4, 1, 5])
    alignment = {"xt_teacher_chunk": torch.tensor([0, 1, 1]), "xt_student_chunk": torch.tensor([0, 0, 1])}
    teacher = TeacherBatch(logits=teacher_logits, alignment=alignment, targets=targets)
    own = torch.log_softmax(teacher_logits, dim=-1)[torch.arange(3), targets]
    want = torch.stack([torch.tensor(0.0), own[0], own[1] + own[2]])
    torch.testing.assert_close(teacher.token_logprobs(torch.tensor([9, 9, 9])), want)
