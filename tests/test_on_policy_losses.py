"""The on-policy losses (skew KL, skew reverse KL, TVD; the sampled-token reverse-KL policy gradient) against
independent float64 computations at a realistic vocabulary, on fixed rollouts."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.losses import (
    discounted_returns,
    kd_divergence_full,
    kd_divergence_topk,
    policy_gradient,
    reverse_kl_tokens,
    token_logprobs,
)

V = 32_000
NEW = ("skew_kl", "skew_reverse_kl", "tvd")
ALL = ("forward_kl", "reverse_kl", "jsd", *NEW)


def reference(div: str, p: torch.Tensor, q: torch.Tensor, *, alpha: float = 0.1, beta: float = 0.5):
    """Per-row divergence in float64, written from the definitions (p teacher, q student; rows sum to 1)."""
    p, q = p.double(), q.double()

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if div == "forward_kl":
        return kl(p, q)
    if div == "reverse_kl":
        return kl(q, p)
    if div == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if div == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if div == "skew_reverse_kl":
        return kl(q, alpha * q + (1 - alpha) * p)
    assert div == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


@pytest.fixture(scope="module")
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, V, generator=g) * 3
    student = torch.randn(6, V, generator=g) * 3
    return teacher, student


@pytest.mark.parametrize("div", ALL)
@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_full_divergence_matches_float64_reference(div: str, temp: float, logits) -> None:
    teacher, student = logits
    p = torch.softmax(teacher.double() / temp, -1)
    q = torch.softmax(student.double() / temp, -1)
    expected = temp**2 * reference(div, p, q, alpha=0.2).sum() / 9
    got = kd_divergence_full(student, teacher, temperature=temp, divergence=div, alpha=0.2, num_tokens=9)
    assert float(got) == pytest.approx(float(expected), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("div", ALL)
@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_topk_divergence_is_exact_on_the_buckets(div: str, temp: float, logits) -> None:
    """Cached top-k + exact tail: the loss equals the float64 divergence of both full distributions at T
    collapsed onto the k listed tokens plus one bucket of every other token."""
    teacher, student = logits
    k = 32
    logp1 = torch.log_softmax(teacher.double(), -1)
    top = logp1.topk(k, dim=-1)
    rest = torch.ones_like(logp1, dtype=torch.bool).scatter(1, top.indices, False)
    tail_lse = torch.logsumexp((logp1 / temp).masked_fill(~rest, float("-inf")), -1)
    p = torch.softmax(teacher.double() / temp, -1)
    q = torch.softmax(student.double() / temp, -1)

    def buckets(d: torch.Tensor) -> torch.Tensor:
        return torch.cat([d.gather(1, top.indices), (d * rest).sum(-1, keepdim=True)], -1)

    expected = temp**2 * reference(div, buckets(p), buckets(q), alpha=0.3).sum() / 6
    got = kd_divergence_topk(student, top.indices, top.values.float(), tail_lse=tail_lse.float(),
                             temperature=temp, divergence=div, alpha=0.3, num_tokens=6)
    assert float(got) == pytest.approx(float(expected), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("div", NEW)
@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_student_equal_to_teacher_gives_zero_loss_and_gradient(div: str, temp: float, logits) -> None:
    teacher, _ = logits
    student = teacher.clone().requires_grad_(True)
    loss = kd_divergence_full(student, teacher, temperature=temp, divergence=div, num_tokens=6)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert float(student.grad.abs().max()) < 1e-6


def test_skew_alpha_zero_is_plain_kl_and_larger_alpha_bounds_it(logits) -> None:
    teacher, student = logits
    common = dict(temperature=1.0, num_tokens=6)
    for skew, plain in (("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")):
        unskewed = float(kd_divergence_full(student, teacher, divergence=skew, alpha=0.0, **common))
        assert unskewed == pytest.approx(
            float(kd_divergence_full(student, teacher, divergence=plain, **common)), rel=1e-5)
        bounded = float(kd_divergence_full(student, teacher, divergence=skew, alpha=0.5, **common))
        assert bounded <= math.log(2) + 1e-6  # KL(a || a/2 + b/2) <= ln 2
    with pytest.raises(ValueError, match="skew alpha"):
        kd_divergence_full(student, teacher, divergence="skew_kl", alpha=1.0, **common)


# --------------------------------------------------------------------------- the policy gradient (opd)


def test_discounted_returns_match_a_plain_loop() -> None:
    rewards = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0, -1.0], dtype=torch.float64)
    counts = torch.tensor([3, 1, 2])
    for gamma in (0.0, 0.5, 1.0):
        expected, start = [], 0
        for n in counts.tolist():
            seg = rewards[start : start + n].tolist()
            expected += [sum(gamma ** (s - t) * seg[s] for s in range(t, n)) for t in range(n)]
            start += n
        got = discounted_returns(rewards, counts, gamma)
        assert got.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="discount"):
        discounted_returns(rewards, counts, 1.5)


@pytest.mark.parametrize("gamma", [0.0, 0.7, 1.0])
def test_policy_gradient_on_fixed_rollouts_matches_float64(gamma: float, logits) -> None:
    """On fixed sampled tokens: the loss and its gradient w.r.t. the student logits equal the float64
    REINFORCE estimate -Σ_t A_t ∇ log q(x_t) / N, with A_t the discounted sum of log p − log q."""
    teacher, student_logits = logits
    counts = torch.tensor([4, 2])
    targets = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(1))
    student = student_logits.clone().requires_grad_(True)
    log_q = token_logprobs(student, targets)
    log_p = token_logprobs(teacher, targets)
    reward = (log_p - log_q).detach()
    loss = policy_gradient(log_q, discounted_returns(reward, counts, gamma), num_tokens=5)
    loss.backward()

    s64 = student_logits.double()
    lq = torch.log_softmax(s64, -1).gather(1, targets[:, None]).squeeze(1)
    lp = torch.log_softmax(teacher.double(), -1).gather(1, targets[:, None]).squeeze(1)
    r = (lp - lq).tolist()
    advantages = []
    for lo, hi in ((0, 4), (4, 6)):
        advantages += [sum(gamma ** (s - t) * r[s] for s in range(t, hi)) for t in range(lo, hi)]
    adv = torch.tensor(advantages, dtype=torch.float64)
    assert float(loss.detach()) == pytest.approx(float(-(adv * lq).sum() / 5), rel=1e-5)
    # d log q(x) / d logits = onehot(x) - softmax(logits)
    grad = torch.nn.functional.one_hot(targets, V).double() - torch.softmax(s64, -1)
    expected = -(adv[:, None] * grad) / 5
    torch.testing.assert_close(student.grad.double(), expected, rtol=1e-4, atol=1e-9)


def test_policy_gradient_is_zero_when_student_equals_teacher(logits) -> None:
    teacher, _ = logits
    student = teacher.clone().requires_grad_(True)
    targets = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(2))
    log_q = token_logprobs(student, targets)
    reward = (token_logprobs(teacher, targets) - log_q).detach()
    loss = policy_gradient(log_q, discounted_returns(reward, torch.tensor([6]), 1.0), num_tokens=6)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(student.grad.abs().max()) == 0.0


def test_reverse_kl_tokens_matches_float64(logits) -> None:
    teacher, student = logits
    p, q = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1)
    expected = reference("reverse_kl", p, q)
    torch.testing.assert_close(reverse_kl_tokens(student, teacher).double(), expected, rtol=1e-4, atol=1e-6)


def test_policy_gradient_is_an_unbiased_estimate_of_the_reverse_kl_gradient() -> None:
    """Averaged over many sampled tokens at one position, the opd loss's gradient w.r.t. the student logits
    approaches the exact gradient of KL(q || p), q ⊙ (log q − log p − KL) (γ = 0, V = 32,000)."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(V, generator=g)
    student[:16] += 9.0  # most of the student's mass on a few tokens, so a few thousand samples suffice
    teacher = student + torch.randn(V, generator=g) * 0.5
    teacher[:16] += torch.linspace(-1.5, 1.5, 16)
    n = 20_000
    samples = torch.multinomial(torch.softmax(student.double(), -1), n, replacement=True, generator=g)
    # Every sample sits at the same position: score each distinct token once and gather (no [n, V] tensor).
    tokens, inverse = samples.unique(return_inverse=True)
    logits = student.clone().requires_grad_(True)
    log_q = token_logprobs(logits.expand(len(tokens), V), tokens)[inverse]
    reward = (token_logprobs(teacher.expand(len(tokens), V), tokens)[inverse] - log_q).detach()
    returns = discounted_returns(reward, torch.ones(n, dtype=torch.long), 0.0)
    policy_gradient(log_q, returns, num_tokens=n).backward()
    estimate = logits.grad.double()
    lq, lp = torch.log_softmax(student.double(), -1), torch.log_softmax(teacher.double(), -1)
    q = lq.exp()
    exact = q * (lq - lp - (q * (lq - lp)).sum())
    assert float((estimate - exact).abs().max()) < 0.1 * float(exact.abs().max())
    assert float(torch.nn.functional.cosine_similarity(estimate, exact, dim=0)) > 0.98
