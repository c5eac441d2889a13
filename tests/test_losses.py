"""Tests for kdlab.losses. Expected values are computed by hand with plain ``math``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdlab.losses import (
    add_weighted,
    cross_entropy_tokens,
    feature_loss,
    kd_divergence_full,
    kd_divergence_topk,
    make_projections,
    mix,
    resolve_layer_map,
    topk_head,
    uniform_layer_map,
)

DIVS = ("forward_kl", "reverse_kl", "jsd")

# Small hand example: 2 tokens, vocabulary of 3.
TEACHER = [[1.0, 2.0, 0.0], [0.5, -1.0, 0.0]]
STUDENT = [[0.0, 1.0, 1.0], [2.0, 0.0, -1.0]]


# --------------------------------------------------------------------------- plain-python references


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(x / t) for x in row]
    z = sum(exps)
    return [e / z for e in exps]


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def jsd(p: list[float], q: list[float], beta: float) -> float:
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def hand(div: str, p: list[float], q: list[float], beta: float = 0.5) -> float:
    if div == "forward_kl":
        return kl(p, q)
    if div == "reverse_kl":
        return kl(q, p)
    return jsd(p, q, beta)


def t(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64).float()


def tail_of(teacher_logits: torch.Tensor, idx: torch.Tensor, temp: float) -> torch.Tensor:
    """What the cache stores: fp32 logsumexp over the non-listed tokens of log_softmax(teacher) / T."""
    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (logp / temp).scatter(1, idx.long(), float("-inf")).logsumexp(dim=-1)


# --------------------------------------------------------------------------- full-vocabulary KD


@pytest.mark.parametrize("div", DIVS)
def test_full_matches_hand_computation(div: str) -> None:
    expected = sum(hand(div, softmax(tr), softmax(sr)) for tr, sr in zip(TEACHER, STUDENT, strict=True)) / 2
    got = kd_divergence_full(t(STUDENT), t(TEACHER), temperature=1.0, divergence=div, num_tokens=2)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_full_jsd_with_beta_matches_hand_computation() -> None:
    beta = 0.2
    expected = sum(jsd(softmax(tr), softmax(sr), beta) for tr, sr in zip(TEACHER, STUDENT, strict=True))
    got = kd_divergence_full(
        t(STUDENT), t(TEACHER), temperature=1.0, divergence="jsd", beta=beta, num_tokens=1
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("div", DIVS)
def test_temperature_scaling_is_t_squared_times_tempered_divergence(div: str) -> None:
    temp = 2.0
    tempered = sum(
        hand(div, softmax(tr, temp), softmax(sr, temp)) for tr, sr in zip(TEACHER, STUDENT, strict=True)
    )
    got = kd_divergence_full(t(STUDENT), t(TEACHER), temperature=temp, divergence=div, num_tokens=2)
    assert got.item() == pytest.approx(temp**2 * tempered / 2, rel=1e-5)


def test_kl_directions_differ() -> None:
    fwd = kd_divergence_full(t(STUDENT), t(TEACHER), temperature=1.0, divergence="forward_kl", num_tokens=2)
    rev = kd_divergence_full(t(STUDENT), t(TEACHER), temperature=1.0, divergence="reverse_kl", num_tokens=2)
    assert abs(fwd.item() - rev.item()) > 1e-3
    # Swapping the roles swaps the directions.
    rev_swapped = kd_divergence_full(
        t(TEACHER), t(STUDENT), temperature=1.0, divergence="forward_kl", num_tokens=2
    )
    assert rev_swapped.item() == pytest.approx(rev.item(), rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_jsd_symmetric_and_bounded_by_ln2(temp: float) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=gen) * 3
    b = torch.randn(5, 7, generator=gen) * 3
    ab = kd_divergence_full(a, b, temperature=temp, divergence="jsd", num_tokens=5)
    ba = kd_divergence_full(b, a, temperature=temp, divergence="jsd", num_tokens=5)
    assert ab.item() == pytest.approx(ba.item(), rel=1e-5)
    # Nearly disjoint distributions approach the bound ln 2 * T^2 without exceeding it.
    peaked_a = torch.tensor([[400.0, 0.0, 0.0]])
    peaked_b = torch.tensor([[0.0, 400.0, 0.0]])
    far = kd_divergence_full(peaked_a, peaked_b, temperature=temp, divergence="jsd", num_tokens=1)
    assert far.item() <= math.log(2) * temp**2 + 1e-5
    assert far.item() == pytest.approx(math.log(2) * temp**2, rel=1e-3)
    assert ab.item() <= math.log(2) * temp**2


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_identical_distributions_give_zero(div: str, temp: float) -> None:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    got = kd_divergence_full(x, x.clone(), temperature=temp, divergence=div, num_tokens=4)
    assert abs(got.item()) < 1e-6
    # Top-k with the stored tail bucket is exact at every T.
    logp = torch.log_softmax(x, dim=-1)
    vals, idx = logp.topk(3, dim=-1)
    got_k = kd_divergence_topk(
        x, idx, vals, tail_lse=tail_of(x, idx, temp), temperature=temp, divergence=div, num_tokens=4
    )
    assert abs(got_k.item()) < 1e-6


@pytest.mark.parametrize("div", DIVS)
def test_gradient_accumulation_invariance(div: str) -> None:
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(6, 5, generator=gen)
    te = torch.randn(6, 5, generator=gen)
    whole = kd_divergence_full(s, te, temperature=2.0, divergence=div, num_tokens=6)
    halves = sum(
        kd_divergence_full(s[sl], te[sl], temperature=2.0, divergence=div, num_tokens=6)
        for sl in (slice(0, 2), slice(2, 6))
    )
    assert halves.item() == pytest.approx(whole.item(), rel=1e-5)
    vals, idx = torch.log_softmax(te, -1).topk(2, dim=-1)
    tail = tail_of(te, idx, 2.0)
    whole_k = kd_divergence_topk(s, idx, vals, tail_lse=tail, temperature=2.0, divergence=div, num_tokens=6)
    halves_k = sum(
        kd_divergence_topk(
            s[sl], idx[sl], vals[sl], tail_lse=tail[sl], temperature=2.0, divergence=div, num_tokens=6
        )
        for sl in (slice(0, 3), slice(3, 6))
    )
    assert halves_k.item() == pytest.approx(whole_k.item(), rel=1e-5)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    whole_ce = cross_entropy_tokens(s, targets, num_tokens=6)
    halves_ce = cross_entropy_tokens(s[:1], targets[:1], num_tokens=6) + cross_entropy_tokens(
        s[1:], targets[1:], num_tokens=torch.tensor(6.0)
    )
    assert halves_ce.item() == pytest.approx(whole_ce.item(), rel=1e-6)


@pytest.mark.parametrize("div", DIVS)
def test_masked_teacher_vocab_is_finite_and_removed_from_support(div: str) -> None:
    teacher = torch.tensor([[1.0, 2.0, 0.0, float("-inf")], [0.5, -1.0, 0.0, float("-inf")]])
    student = torch.tensor([[0.0, 1.0, 1.0, 5.0], [2.0, 0.0, -1.0, 3.0]], requires_grad=True)
    got = kd_divergence_full(student, teacher, temperature=1.0, divergence=div, num_tokens=2)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(student.grad).all()
    assert torch.all(student.grad[:, 3] == 0)
    expected = sum(hand(div, softmax(tr), softmax(sr)) for tr, sr in zip(TEACHER, STUDENT, strict=True)) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_low_precision_teacher_and_bad_arguments() -> None:
    got = kd_divergence_full(t(STUDENT), t(TEACHER).half(), temperature=1.0, divergence="jsd", num_tokens=2)
    assert got.dtype == torch.float32
    with pytest.raises(ValueError, match="divergence"):
        kd_divergence_full(t(STUDENT), t(TEACHER), temperature=1.0, divergence="kl", num_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        kd_divergence_full(t(STUDENT), t(TEACHER), temperature=0.0, divergence="jsd", num_tokens=2)
    with pytest.raises(ValueError, match="num_tokens"):
        kd_divergence_full(t(STUDENT), t(TEACHER), temperature=1.0, divergence="jsd", num_tokens=0)
    with pytest.raises(ValueError, match="shape"):
        kd_divergence_full(t(STUDENT), t(TEACHER)[:, :2], temperature=1.0, divergence="jsd", num_tokens=2)


# --------------------------------------------------------------------------- top-k KD


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("idx_dtype", [torch.uint16, torch.int32, torch.int64])
def test_topk_with_k_equal_vocab_matches_full(div: str, temp: float, idx_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(4, 6, generator=gen)
    te = torch.randn(4, 6, generator=gen) * 2
    full = kd_divergence_full(s, te, temperature=temp, divergence=div, num_tokens=4)
    # Shuffled order: buckets must follow the indices, not the position.
    vals, idx = torch.log_softmax(te, -1).sort(dim=-1)
    no_tail = torch.full((4,), float("-inf"))
    topk = kd_divergence_topk(
        s, idx.to(idx_dtype), vals, tail_lse=no_tail, temperature=temp, divergence=div, num_tokens=4
    )
    assert topk.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("k", [2, 4])
def test_topk_masked_teacher_entries_are_finite(div: str, k: int) -> None:
    teacher = torch.tensor([[1.0, 2.0, 0.0, float("-inf")], [0.5, -1.0, 0.0, float("-inf")]])
    vals, idx = torch.log_softmax(teacher, -1).sort(dim=-1, descending=True)
    tail = tail_of(teacher, idx[:, :k], 2.0)  # -inf at k = 4: only the impossible token is left
    vals, idx = vals[:, :k].clone(), idx[:, :k]
    if k == 2:
        vals[:, 1] = float("-inf")  # a listed token the teacher rules out
    student = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), requires_grad=True)
    got = kd_divergence_topk(student, idx, vals, tail_lse=tail, temperature=2.0, divergence=div, num_tokens=2)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(student.grad).all()
    if k == 4:
        full = kd_divergence_full(student, teacher, temperature=2.0, divergence=div, num_tokens=2)
        assert got.item() == pytest.approx(full.item(), rel=1e-5)


# Teacher [0.5, 0.3, 0.15, 0.05] stored as top-2 -> tail tokens 0.15 and 0.05; student logits below.
TOPK_P = [0.5, 0.3]
TAIL_P = [0.15, 0.05]
TOPK_STUDENT = [1.0, 0.0, 0.5, -1.0]


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_topk_with_tail_matches_hand_computation(div: str, temp: float) -> None:
    # Tempered teacher: p_i^(1/T) per token, the tail bucket sums its tokens' tempered weights.
    w = [x ** (1 / temp) for x in TOPK_P] + [sum(x ** (1 / temp) for x in TAIL_P)]
    p = [x / sum(w) for x in w]
    q_full = softmax(TOPK_STUDENT, temp)
    q = [q_full[0], q_full[1], q_full[2] + q_full[3]]
    expected = temp**2 * hand(div, p, q)
    got = kd_divergence_topk(
        torch.tensor([TOPK_STUDENT]),
        torch.tensor([[0, 1]]),
        torch.tensor([[math.log(x) for x in TOPK_P]]),
        tail_lse=torch.tensor([math.log(sum(x ** (1 / temp) for x in TAIL_P))]),
        temperature=temp,
        divergence=div,
        num_tokens=1,
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_topk_index_order_is_respected() -> None:
    # Listing the tokens as [2, 0] must score the student at those ids.
    p = [0.5, 0.3]
    q_full = softmax(TOPK_STUDENT)
    q = [q_full[2], q_full[0], q_full[1] + q_full[3]]
    expected = kl([*p, 0.2], q)
    got = kd_divergence_topk(
        torch.tensor([TOPK_STUDENT]),
        torch.tensor([[2, 0]], dtype=torch.int32),
        torch.tensor([[math.log(0.5), math.log(0.3)]]),
        tail_lse=torch.tensor([math.log(0.2)]),
        temperature=1.0,
        divergence="forward_kl",
        num_tokens=1,
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("tail", [-60.0, float("-inf")])
def test_topk_tiny_or_empty_teacher_tail_stays_finite(div: str, tail: float) -> None:
    # A confident teacher's tail (exp(-60)) or none at all (-inf: every other token impossible, so the
    # student's tail bucket leaves the support too): reverse KL and JSD stay finite.
    logp = torch.tensor([[0.0, -30.0]], dtype=torch.float16)
    student = torch.tensor([[3.0, 0.0, 1.0, 0.5]], requires_grad=True)
    got = kd_divergence_topk(
        student, torch.tensor([[0, 1]]), logp, tail_lse=torch.tensor([tail]), temperature=2.0,
        divergence=div, num_tokens=1,
    )
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    if tail == float("-inf"):  # the student's tail logits get no gradient
        assert torch.all(student.grad[0, 2:] == 0)


# --------------------------------------------------------------------------- top-k KD is exact at every T
# A realistic vocabulary and teachers of three shapes: spread (randn * 3), Zipf-like and confident.

VOCAB = 32_000
CACHED_K = 32
EXACT_CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


@pytest.fixture(scope="module")
def realistic() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    spread = torch.randn(VOCAB, generator=gen) * 3
    ranks = torch.randperm(VOCAB, generator=gen).double() + 1
    zipf = (-1.1 * ranks.log()).float()
    confident = torch.randn(VOCAB, generator=gen) * 2
    confident[123] += 25.0
    teacher = torch.stack([spread, zipf, confident])
    student = torch.randn(3, VOCAB, generator=gen) * 3
    return {"teacher": teacher, "student": student, "logp": torch.log_softmax(teacher, dim=-1)}


def bucket_reference(
    teacher: torch.Tensor, student: torch.Tensor, idx: torch.Tensor, temp: float, div: str, beta: float
) -> float:
    """Independent float64 reference: full tempered distributions, probabilities summed onto the k listed
    tokens + one tail bucket, then the divergence per row, times T^2, averaged over rows."""
    total = 0.0
    for row in range(teacher.shape[0]):
        buckets = []
        for logits in (teacher[row], student[row]):
            prob = torch.softmax(logits.double() / temp, dim=-1)
            listed = prob[idx[row]]
            outside = torch.ones_like(prob, dtype=torch.bool)
            outside[idx[row]] = False
            buckets.append(torch.cat([listed, prob[outside].sum().reshape(1)]))
        p, q = buckets

        def kl64(a: torch.Tensor, b: torch.Tensor) -> float:
            keep = a > 0
            return float((a[keep] * (a[keep].log() - b[keep].log())).sum())

        if div == "forward_kl":
            d = kl64(p, q)
        elif div == "reverse_kl":
            d = kl64(q, p)
        else:
            m = beta * p + (1 - beta) * q
            d = beta * kl64(p, m) + (1 - beta) * kl64(q, m)
        total += temp**2 * d
    return total / teacher.shape[0]


@pytest.mark.parametrize(("div", "beta"), EXACT_CASES)
@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0, 4.0])
def test_topk_is_exact_at_every_temperature(
    realistic: dict[str, torch.Tensor], temp: float, div: str, beta: float
) -> None:
    teacher, logp = realistic["teacher"], realistic["logp"]
    vals32, idx32 = logp.topk(CACHED_K, dim=-1)
    tail32 = tail_of(teacher, idx32, temp)
    for k in (1, 8, CACHED_K):
        vals, idx = vals32[:, :k], idx32[:, :k]
        tail = tail_of(teacher, idx, temp)  # a cache built with this k
        common = dict(temperature=temp, divergence=div, beta=beta, num_tokens=3)

        # (a) student == teacher: zero loss and zero gradient.
        same = teacher.clone().requires_grad_(True)
        zero = kd_divergence_topk(same, idx, vals, tail_lse=tail, **common)
        zero.backward()
        assert abs(zero.item()) < 1e-5, (k, zero.item())
        assert same.grad.abs().max().item() < 1e-5, k

        # (b) equals the float64 bucket reference for an unrelated student.
        student = realistic["student"]
        got = kd_divergence_topk(student, idx, vals, tail_lse=tail, **common)
        want = bucket_reference(teacher, student, idx, temp, div, beta)
        assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6), (k, got.item(), want)

        # (c) the first k entries of a k = 32 cache, folded by topk_head, equal a k cache.
        h_idx, h_vals, h_tail = topk_head(idx32, vals32, tail32, k=k, temperature=temp)
        assert torch.equal(h_idx, idx) and torch.equal(h_vals, vals)
        torch.testing.assert_close(h_tail, tail, rtol=1e-5, atol=1e-5)
        sliced = kd_divergence_topk(student, h_idx, h_vals, tail_lse=h_tail, **common)
        assert sliced.item() == pytest.approx(got.item(), rel=1e-5, abs=1e-7)


def test_topk_exact_with_fp16_cached_logprobs(realistic: dict[str, torch.Tensor]) -> None:
    """The cache keeps fp16 top-k log-probs but an fp32 tail: student == teacher stays ~0 at T = 2
    (the single-token tail approximation gave 5.46 here)."""
    teacher, logp = realistic["teacher"], realistic["logp"]
    vals, idx = logp.topk(CACHED_K, dim=-1)
    for temp in (0.5, 2.0):
        got = kd_divergence_topk(teacher, idx, vals.half(), tail_lse=tail_of(teacher, idx, temp),
                                 temperature=temp, divergence="forward_kl", num_tokens=3)
        assert abs(got.item()) < 1e-4, (temp, got.item())


def test_topk_head_checks_k() -> None:
    vals, idx = torch.log_softmax(torch.randn(2, 10), -1).topk(4, dim=-1)
    with pytest.raises(ValueError, match="k must be in"):
        topk_head(idx, vals, torch.zeros(2), k=5, temperature=1.0)
    same = topk_head(idx, vals, torch.zeros(2), k=4, temperature=1.0)
    assert same[0] is idx and same[1] is vals


def test_topk_bad_shapes_raise() -> None:
    s = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="k <= V"):
        kd_divergence_topk(
            s,
            torch.zeros(2, 5, dtype=torch.long),
            torch.zeros(2, 5),
            tail_lse=torch.zeros(2),
            temperature=1.0,
            divergence="jsd",
            num_tokens=2,
        )
    with pytest.raises(ValueError, match="same shape"):
        kd_divergence_topk(
            s,
            torch.zeros(2, 2, dtype=torch.long),
            torch.zeros(2, 3),
            tail_lse=torch.zeros(2),
            temperature=1.0,
            divergence="jsd",
            num_tokens=2,
        )
    with pytest.raises(ValueError, match="tail_lse"):
        kd_divergence_topk(
            s,
            torch.zeros(2, 2, dtype=torch.long),
            torch.zeros(2, 2),
            tail_lse=torch.zeros(2, 1),
            temperature=1.0,
            divergence="jsd",
            num_tokens=2,
        )


# --------------------------------------------------------------------------- CE and mixing


def test_cross_entropy_hand_case() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([2, 0])
    expected = (math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 3 + math.log(3)) / 4
    got = cross_entropy_tokens(logits, targets, num_tokens=4)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_mix_and_add_weighted() -> None:
    task = torch.tensor(2.0, requires_grad=True) * 1.0
    kd = torch.tensor(5.0, requires_grad=True) * 1.0
    assert mix(task, kd, 0.0) is task
    assert mix(task, kd, 0) is task
    assert mix(task, kd, 1.0) is kd
    assert mix(task, kd, 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 5)
    assert add_weighted(task, kd, 0.0) is task
    assert add_weighted(task, kd, 0.5).item() == pytest.approx(2 + 0.5 * 5)
    with pytest.raises(ValueError):
        mix(task, kd, 1.5)
    with pytest.raises(ValueError):
        add_weighted(task, kd, -0.1)


# --------------------------------------------------------------------------- feature distillation


def test_feature_mse_hand_case() -> None:
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    te = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float16)
    # Raw states: token 1: (1 + 4) / 2 = 2.5; token 2: (1 + 1) / 2 = 1; the two equal pairs are averaged.
    raw = feature_loss([s, s], [te, te], None, kind="mse", normalize="none", num_tokens=2)
    assert raw.item() == pytest.approx(3.5 / 2)
    # Layer-normed: [1, 2] -> [-1, 1], constant rows -> [0, 0]; token 1: (1 + 1) / 2 = 1, token 2: 0.
    normed = feature_loss([s, s], [te, te], None, kind="mse", num_tokens=2)
    assert normed.item() == pytest.approx(1 / 2, rel=1e-4)  # layer norm's eps shifts it slightly
    one_pair = feature_loss([s], [te], None, kind="mse", num_tokens=2)
    assert one_pair.item() == pytest.approx(normed.item())


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_is_scale_free_and_zero_on_match(kind: str) -> None:
    gen = torch.Generator().manual_seed(6)
    pairs = [(1, 2), (2, 4), (3, 6)]
    projections = make_projections(pairs, student_width=8, teacher_width=16)
    s = [torch.randn(5, 8, generator=gen) for _ in pairs]
    te = [torch.randn(5, 16, generator=gen) * 3 + 1 for _ in pairs]
    base = feature_loss(s, te, projections, kind=kind, num_tokens=5)
    scaled = feature_loss(s, [100 * x for x in te], projections, kind=kind, num_tokens=5)
    assert scaled.item() == pytest.approx(base.item(), rel=1e-4)
    assert 0.1 < base.item() < 10  # of order 1 per token, whatever the number of pairs
    with torch.no_grad():
        matched = [proj(x) for proj, x in zip(projections, s, strict=True)]
    assert abs(feature_loss(s, matched, projections, kind=kind, num_tokens=5).item()) < 1e-5
    if kind == "mse":  # an affine change of the teacher state leaves the normed states equal
        same = feature_loss(s, [100 * x - 7 for x in matched], projections, kind=kind, num_tokens=5)
        assert abs(same.item()) < 1e-5
        with pytest.raises(ValueError, match="normalize"):
            feature_loss(s, te, projections, kind=kind, normalize="batchnorm", num_tokens=5)


def test_feature_cosine_of_same_direction_is_zero() -> None:
    s = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, 4.0]])
    got = feature_loss([s], [3.0 * s], None, kind="cosine", num_tokens=2)
    assert abs(got.item()) < 1e-6
    opposite = feature_loss([s], [-s], None, kind="cosine", num_tokens=2)
    assert opposite.item() == pytest.approx(2.0)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_gradient_reaches_projections_not_teacher(kind: str) -> None:
    gen = torch.Generator().manual_seed(4)
    pairs = [(1, 2), (2, 4)]
    projections = make_projections(pairs, student_width=3, teacher_width=5)
    s = [torch.randn(4, 3, generator=gen, requires_grad=True) for _ in pairs]
    te = [torch.randn(4, 5, generator=gen, requires_grad=True).to(torch.bfloat16) for _ in pairs]
    loss = feature_loss(s, te, projections, kind=kind, num_tokens=4)
    loss.backward()
    for proj in projections:
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert all(x.grad is not None for x in s)
    assert loss.grad_fn is not None


def test_feature_teacher_is_detached() -> None:
    leaf = torch.randn(2, 3, requires_grad=True)
    loss = feature_loss([torch.randn(2, 3, requires_grad=True)], [leaf * 2], None, num_tokens=2)
    loss.backward()
    assert leaf.grad is None


def test_make_projections_identity_when_widths_match() -> None:
    projections = make_projections([(1, 1), (2, 2)], 4, 4)
    x = torch.randn(3, 4)
    assert len(projections) == 2
    assert torch.equal(projections[0](x), x)
    assert isinstance(projections[1], nn.Linear)


# --------------------------------------------------------------------------- layer maps


def test_uniform_layer_map_last_to_last_and_never_embedding() -> None:
    pairs = uniform_layer_map(10, 30)
    assert len(pairs) == 10
    assert pairs[-1] == (10, 30)
    assert pairs[0] == (1, 3)
    assert all(s > 0 and te > 0 for s, te in pairs)
    assert [te for _, te in pairs] == sorted(te for _, te in pairs)
    assert uniform_layer_map(10, 30, include_embedding=True)[0] == (0, 0)
    assert uniform_layer_map(4, 6) == [(1, 2), (2, 3), (3, 5), (4, 6)]  # half-up rounding
    few = uniform_layer_map(12, 24, num_pairs=3)
    assert few == [(4, 8), (8, 16), (12, 24)]


def test_resolve_layer_map() -> None:
    assert resolve_layer_map("last", 6, 24) == [(6, 24)]
    assert resolve_layer_map("uniform", 10, 30) == uniform_layer_map(10, 30)
    assert resolve_layer_map([[1, 2], (6, 24)], 6, 24) == [(1, 2), (6, 24)]
    with pytest.raises(ValueError, match=r"\[7, 3\].*student 0\.\.6, teacher 0\.\.24"):
        resolve_layer_map([[1, 2], [7, 3]], 6, 24)
    with pytest.raises(ValueError, match=r"\[1, 25\]"):
        resolve_layer_map([[1, 25]], 6, 24)
    with pytest.raises(ValueError, match="uniform"):
        resolve_layer_map("middle", 6, 24)
    with pytest.raises(ValueError):
        resolve_layer_map([[1, 2, 3]], 6, 24)
