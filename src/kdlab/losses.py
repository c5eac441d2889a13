"""Loss functions for knowledge distillation (pure tensor code: no I/O, no model objects).

Conventions shared by every function here
-----------------------------------------
* Logits are for the *scored positions only*, already gathered and flattened to ``[N, V]``
  (``N`` = answer tokens in this micro-batch). Shifting, padding removal and masking of prompt
  tokens are the caller's job.
* Every per-token loss is **summed over the N rows and divided by** ``num_tokens``, which must be
  the number of answer tokens in the *global* (optimizer-step) batch. Summing the results of the
  micro-batches of one step then gives exactly the whole-batch mean, whatever the split or the
  padding. ``num_tokens`` may be a Python number or a 0-d tensor (e.g. after an all-reduce).
* Divergences are computed in float32 whatever the input dtype and returned as a float32 scalar.
* Every distillation divergence (forward KL, reverse KL and JSD alike) is computed between the
  tempered distributions ``softmax(logits / T)`` and multiplied by ``T**2`` (Hinton et al., 2015),
  so that gradient magnitudes do not shrink as the temperature grows.
* ``p`` always denotes the teacher, ``q`` the student:
  ``forward_kl = KL(p || q)``, ``reverse_kl = KL(q || p)``,
  ``jsd = beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``:
  ``beta`` is the *teacher's* weight in the mixture (generalized JSD of Agarwal et al., 2024, "GKD",
  with the same convention as TRL's ``GKDTrainer``); ``beta = 0.5`` is the standard JSD, bounded by
  ``ln 2``.
* Skew divergences (Ko et al., 2024, "DistiLLM"): ``skew_kl = KL(p || alpha*p + (1 - alpha)*q)`` and
  ``skew_reverse_kl = KL(q || alpha*q + (1 - alpha)*p)``; ``alpha`` is the weight of the distribution
  the KL is taken *from* (DistiLLM's convention; alpha = 0 is plain KL, larger alpha bounds the loss by
  ``-ln alpha``). ``tvd = 1/2 * sum |p - q|`` (total variation distance, bounded by 1).
* Top-k KD (:func:`kd_divergence_topk`) is exact at every temperature: the cache stores, besides
  the teacher's top-k log-probs, the fp32 log-sum-exp of its tempered non-top-k log-probs.
* Feature KD (:func:`feature_loss`) compares layer-normed hidden states by default, so its scale
  (order 1 per token) does not depend on the teacher's hidden-state magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
FEATURE_KINDS = ("mse", "cosine")
FEATURE_NORMS = ("layernorm", "none")

_NumTokens = int | float | Tensor


# --------------------------------------------------------------------------- helpers


def _check_common(temperature: float, divergence: str, beta: float, alpha: float = 0.1) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        # beta in {0, 1} makes the mixture collapse onto one side and the loss identically 0.
        raise ValueError(f"jsd beta must be in the open interval (0, 1), got {beta}")
    if divergence.startswith("skew") and not 0.0 <= alpha < 1.0:
        # alpha = 1 makes the mixture the distribution itself and the loss identically 0.
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")


def _normalise(total: Tensor, num_tokens: _NumTokens) -> Tensor:
    # Python numbers are checked here; tensors are not, to avoid a device sync.
    if not isinstance(num_tokens, Tensor) and not num_tokens > 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return total / num_tokens


def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Row-wise KL(a || b) from log-probabilities; entries with a == 0 contribute exactly 0.

    The ``where`` is applied to the log-difference *before* multiplying so that
    ``0 * (-inf - -inf)`` never produces NaN, in the forward or the backward pass.
    """
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * diff).sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(w*a + (1-w)*b)`` via logsumexp, so tiny a and b do not underflow to log(0). Entries outside
    both supports are set to 0 first: logsumexp of all -inf has a NaN gradient (they contribute 0 to any
    KL taken against the mixture)."""
    if weight_a == 0.0:
        return log_b
    outside = torch.isneginf(log_a) & torch.isneginf(log_b)
    return torch.logsumexp(
        torch.stack(
            [
                log_a.masked_fill(outside, 0.0) + math.log(weight_a),
                log_b.masked_fill(outside, 0.0) + math.log1p(-weight_a),
            ]
        ),
        dim=0,
    )


def _divergence_rows(
    log_p: Tensor, log_q: Tensor, divergence: str, beta: float, alpha: float = 0.1
) -> Tensor:
    """Per-row divergence between teacher ``log_p`` and student ``log_q`` (both [N, K], fp32)."""
    if divergence == "forward_kl":
        return _kl_rows(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl_rows(log_q, log_p)
    if divergence == "skew_kl":
        return _kl_rows(log_p, _log_mixture(log_p, log_q, alpha))
    if divergence == "skew_reverse_kl":
        return _kl_rows(log_q, _log_mixture(log_q, log_p, alpha))
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)


# --------------------------------------------------------------------------- KD on logits


def kd_divergence_full(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    divergence: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    num_tokens: _NumTokens,
) -> Tensor:
    """Distillation divergence against a full-vocabulary teacher.

    ``p = softmax(teacher / T)``, ``q = softmax(student / T)``; returns
    ``T**2 * sum_rows D(p, q) / num_tokens`` with ``D`` chosen by ``divergence`` (see module doc).

    Args:
        student_logits: [N, V] student logits of the scored positions (any float dtype).
        teacher_logits: [N, V] teacher logits of the same positions (fp16/bf16 allowed). Entries
            equal to ``-inf`` mark vocabulary rows that do not exist (e.g. padded embedding rows):
            they are removed from the support of **both** distributions, so the student is
            renormalised over the teacher's valid tokens. Each row needs one finite entry.
        temperature: softmax temperature ``T > 0``.
        divergence: one of ``DIVERGENCES`` (see module doc).
        beta: mixture weight of the teacher for "jsd", in (0, 1); ignored otherwise.
        alpha: skew weight for "skew_kl" / "skew_reverse_kl", in [0, 1); ignored otherwise.
        num_tokens: answer tokens in the global batch (see module doc).
    """
    _check_common(temperature, divergence, beta, alpha)
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must both be [N, V] with the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    teacher = teacher_logits.detach().float() / temperature
    invalid = torch.isneginf(teacher)
    student = student_logits.float().masked_fill(invalid, float("-inf")) / temperature
    log_p = F.log_softmax(teacher, dim=-1)
    log_q = F.log_softmax(student, dim=-1)
    per_row = _divergence_rows(log_p, log_q, divergence, beta, alpha)
    return _normalise(per_row.sum() * temperature**2, num_tokens)


def topk_head(
    topk_indices: Tensor,
    topk_logprobs: Tensor,
    tail_lse: Tensor,
    *,
    k: int,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``k`` of ``K`` cached entries, with the dropped ones folded into the tempered tail.

    ``tail_lse`` is the cached ``logsumexp_{j not in top-K}(logp_j / T)`` ([N], fp32); the tail of
    the top-k' head is ``logsumexp([tail_lse, logp[k:K] / T])``, so one cache serves every
    ``k <= K``. Returns ``(indices [N, k], logprobs [N, k], tail_lse [N] float32)``; ``k == K``
    returns the inputs unchanged (the tail as float32).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    cached = topk_indices.shape[-1]
    if not 1 <= k <= cached:
        raise ValueError(f"k must be in [1, {cached}] (the cached top-k), got {k}")
    tail = tail_lse.detach().float()
    if k == cached:
        return topk_indices, topk_logprobs, tail
    dropped = topk_logprobs[:, k:].detach().float() / temperature
    tail = torch.logsumexp(torch.cat([tail.unsqueeze(-1), dropped], dim=-1), dim=-1)
    return topk_indices[:, :k], topk_logprobs[:, :k], tail


def _topk_buckets(
    student_logits: Tensor,
    topk_indices: Tensor,
    topk_logprobs: Tensor,
    tail_lse: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probabilities over the k listed tokens (+1 tail bucket), both [N, k(+1)]."""
    vocab = student_logits.shape[-1]
    k = topk_indices.shape[-1]
    idx = topk_indices.to(torch.int64)
    t_logp = topk_logprobs.detach().float()
    valid = ~torch.isneginf(t_logp)

    # Student: top-k entries the teacher marks impossible (-inf) are dropped from the support,
    # consistent with kd_divergence_full; every token not listed forms the tail bucket.
    s = student_logits.float() / temperature
    s_buckets = s.gather(1, idx).masked_fill(~valid, float("-inf"))
    # Teacher: exp(logp_i / T) for the listed tokens; the tail bucket is the exact tempered mass of the
    # others, exp(tail_lse). The teacher's own normaliser (LSE / T) shifts every bucket equally and
    # cancels in the log-softmax below.
    t_buckets = t_logp / temperature
    if k < vocab:  # static: no tail bucket when every token is listed
        s_tail = torch.logsumexp(s.scatter(1, idx, float("-inf")), dim=-1, keepdim=True)
        t_tail = tail_lse.detach().float().unsqueeze(-1)
        # An empty teacher tail (all other tokens impossible) leaves the student's support too.
        s_tail = s_tail.masked_fill(torch.isneginf(t_tail), float("-inf"))
        s_buckets = torch.cat([s_buckets, s_tail], dim=-1)
        t_buckets = torch.cat([t_buckets, t_tail], dim=-1)
    return F.log_softmax(t_buckets, dim=-1), F.log_softmax(s_buckets, dim=-1)


def kd_divergence_topk(
    student_logits: Tensor,
    topk_indices: Tensor,
    topk_logprobs: Tensor,
    *,
    tail_lse: Tensor,
    temperature: float,
    divergence: str,
    beta: float = 0.5,
    alpha: float = 0.1,
    num_tokens: _NumTokens,
) -> Tensor:
    """Distillation divergence against a teacher stored as its top-k log-probabilities plus its tail.

    Both tempered distributions are collapsed onto ``k + 1`` buckets (the ``k`` listed tokens and
    one tail bucket holding every other token) by summing probabilities, and the divergence over
    the buckets is multiplied by ``T**2``, summed over rows and divided by ``num_tokens``. The
    result is exact (no approximation of the teacher's tail) at every temperature.

    Teacher buckets: ``p = log_softmax([logp_1 / T, ..., logp_k / T, tail_lse])`` where ``logp``
    are the teacher's log-probs at T = 1 and ``tail_lse = logsumexp_{j not listed}(logp_j / T)``
    was computed in fp32 from the full logits (see ``TeacherCache``; :func:`topk_head` folds the
    dropped entries into it when fewer than the cached k are used). The teacher's normaliser at
    temperature T is a common shift of every bucket and cancels.

    Student buckets: ``q = softmax(student / T)`` read at the listed indices, and ``q_tail`` the mass
    of the other tokens, computed as a logsumexp over the non-listed logits (no ``1 - sum``
    cancellation).

    When ``k == V`` there is no tail bucket (``tail_lse`` is ``-inf`` and ignored) and the result
    equals :func:`kd_divergence_full` up to fp rounding.

    Args:
        student_logits: [N, V] student logits of the scored positions.
        topk_indices: [N, k] token ids, any integer dtype (uint16/int32/int64); must be distinct
            within a row.
        topk_logprobs: [N, k] teacher log-probabilities at T = 1 (fp16 allowed; computed in
            fp32). ``-inf`` entries mark impossible tokens and are removed from both supports.
        tail_lse: [N] ``logsumexp`` over the non-listed tokens of ``logp / T``, at this
            ``temperature``. ``-inf`` (no possible tail token) removes the tail bucket from both
            supports.
        temperature, divergence, beta, alpha, num_tokens: as in :func:`kd_divergence_full`.
    """
    _check_common(temperature, divergence, beta, alpha)
    if student_logits.ndim != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    n, vocab = student_logits.shape
    if topk_indices.shape != topk_logprobs.shape or topk_indices.ndim != 2:
        raise ValueError(
            "topk_indices and topk_logprobs must both be [N, k] with the same shape, got "
            f"{tuple(topk_indices.shape)} and {tuple(topk_logprobs.shape)}"
        )
    if topk_indices.shape[0] != n or not 1 <= topk_indices.shape[1] <= vocab:
        raise ValueError(
            f"top-k tensors of shape {tuple(topk_indices.shape)} do not fit student logits "
            f"[{n}, {vocab}] (need N rows and 1 <= k <= V)"
        )
    if tail_lse.shape != (n,):
        raise ValueError(f"tail_lse must be [N] = [{n}], got {tuple(tail_lse.shape)}")
    log_p, log_q = _topk_buckets(student_logits, topk_indices, topk_logprobs, tail_lse, temperature)
    per_row = _divergence_rows(log_p, log_q, divergence, beta, alpha)
    return _normalise(per_row.sum() * temperature**2, num_tokens)


def cross_entropy_tokens(logits: Tensor, targets: Tensor, *, num_tokens: _NumTokens) -> Tensor:
    """Summed token cross-entropy of [N, V] ``logits`` against [N] ``targets``, / ``num_tokens``.

    Computed in fp32 (as HF does for its LM loss). Targets equal to -100 contribute 0 but still
    count in whatever ``num_tokens`` the caller passes, so normally pass only real targets.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, V] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    total = F.cross_entropy(logits.float(), targets.long(), reduction="sum")
    return _normalise(total, num_tokens)


# --------------------------------------------------------------------------- on-policy (sampled tokens)


def token_logprobs(logits: Tensor, targets: Tensor, *, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / T)[target]`` per row, fp32 ([N, V] logits, [N] targets -> [N])."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, V] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    return log_probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)


def reverse_kl_tokens(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(q || p) per row at T = 1 over the full vocabulary ([N, V] each -> [N], fp32): how far each sampled
    position's student distribution is from the teacher's (logged with the rollouts)."""
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    return _kl_rows(log_q, log_p)


def discounted_returns(rewards: Tensor, counts: Tensor, gamma: float) -> Tensor:
    """Per token, ``sum_{s >= t} gamma^(s - t) * r_s`` over the rest of its own sequence.

    ``rewards`` [N] are row-major over the sequences whose lengths are ``counts`` [B] (as `Scored`
    rows); ``gamma = 0`` returns the rewards themselves, ``gamma = 1`` the sum over the rest of the answer.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {gamma}")
    if gamma == 0.0:
        return rewards
    out = torch.empty_like(rewards)
    start = 0
    for n in counts.tolist():
        segment = rewards[start : start + n]
        # A reversed cumulative sum with decay: r_t + gamma * G_{t+1}; answers are short, so a loop.
        running = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        for t in range(n - 1, -1, -1):
            running = segment[t] + gamma * running
            out[start + t] = running
        start += n
    return out


def policy_gradient(logprobs: Tensor, advantages: Tensor, *, num_tokens: _NumTokens) -> Tensor:
    """REINFORCE on sampled tokens: ``-sum_t A_t * log q(x_t) / num_tokens`` with ``A`` held constant.

    Its gradient is the policy gradient of the expected advantage; with the sampled-token reward
    ``r_t = log p(x_t) - log q(x_t)`` it is the gradient of the reverse KL(q || p) (the score-function term
    ``E_q[grad log q]`` is 0 in expectation).
    """
    if logprobs.shape != advantages.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and advantages {tuple(advantages.shape)} differ")
    return _normalise(-(advantages.detach().float() * logprobs.float()).sum(), num_tokens)


# --------------------------------------------------------------------------- loss mixing


def mix(task_loss: Tensor, kd_loss: Tensor, lam: float) -> Tensor:
    """``(1 - lam) * task_loss + lam * kd_loss`` (logit KD variants KD1 and KD2).

    ``lam == 0`` returns ``task_loss`` itself and ``lam == 1`` returns ``kd_loss`` itself, so the
    autograd graph is exactly that of plain SFT (resp. pure KD). Feature distillation (KD3) does
    not use this convex mix but :func:`add_weighted`: ``task + lam * feature``.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mix weight lam must be in [0, 1], got {lam}")
    if lam == 0:
        return task_loss
    if lam == 1:
        return kd_loss
    return (1.0 - lam) * task_loss + lam * kd_loss


def add_weighted(task_loss: Tensor, aux_loss: Tensor, lam: float) -> Tensor:
    """``task_loss + lam * aux_loss`` (KD3: task loss plus weighted feature loss).

    ``lam == 0`` returns ``task_loss`` itself (same graph as SFT).
    """
    if not lam >= 0:
        raise ValueError(f"auxiliary weight lam must be >= 0, got {lam}")
    if lam == 0:
        return task_loss
    return task_loss + lam * aux_loss


# --------------------------------------------------------------------------- feature distillation


def feature_loss(
    student_hidden: list[Tensor],
    teacher_hidden: list[Tensor],
    projections: Sequence[nn.Module] | None,
    *,
    kind: str = "mse",
    normalize: str = "layernorm",
    num_tokens: _NumTokens,
) -> Tensor:
    """Hidden-state matching loss, averaged over the mapped layer pairs.

    Element ``l`` of the lists is one layer pair: student ``[N, d_s]`` and teacher ``[N, d_t]``,
    rows already restricted to the real scored tokens (same rows, same order). The student is
    mapped by ``projections[l]`` (``None``: identity, needs ``d_s == d_t``), the matmul in the
    student states' dtype (see :func:`_project`). The teacher is detached; the reduction runs in fp32.

    * ``kind="mse"``: squared error averaged over the feature dim, summed over tokens. With
      ``normalize="layernorm"`` (the default) both the projected student state and the teacher
      state first go through a parameter-free layer norm (zero mean, unit variance over the
      feature dim), so a token contributes a term of order 1 (0 when the states agree up to an
      affine shift/scale, about 2 for unrelated states) whatever the teacher's hidden-state
      magnitudes; ``normalize="none"`` compares raw states.
    * ``kind="cosine"``: ``1 - cos(proj(h_s), h_t)`` summed over tokens (already scale-free;
      ``normalize`` does not apply).

    Each pair's sum is divided by ``num_tokens`` and the pairs are **averaged**, so the weight
    ``lam`` of :func:`add_weighted` means the same whatever the number of pairs.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
    if normalize not in FEATURE_NORMS:
        raise ValueError(f"normalize must be one of {FEATURE_NORMS}, got {normalize!r}")
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(
            "need the same, non-zero number of student and teacher hidden states, got "
            f"{len(student_hidden)} and {len(teacher_hidden)}"
        )
    if projections is not None and len(projections) != len(student_hidden):
        raise ValueError(f"got {len(projections)} projections for {len(student_hidden)} layer pairs")
    projected = _project(student_hidden, projections)  # [L, N, d_t], the student's compute dtype
    for layer, (h_s, h_t) in enumerate(zip(projected, teacher_hidden, strict=True)):
        if h_s.shape != h_t.shape:
            raise ValueError(
                f"layer pair {layer}: projected student {tuple(h_s.shape)} vs teacher {tuple(h_t.shape)}"
            )
    # Every pair at once: one layer norm and one reduction over [L, N, d] instead of a kernel chain per pair.
    s32 = projected.float()
    t32 = torch.stack([h.detach() for h in teacher_hidden]).float()
    if kind == "mse":
        if normalize == "layernorm":
            # No affine parameters: the target is the teacher's direction pattern, not its scale.
            s32 = F.layer_norm(s32, s32.shape[-1:])
            t32 = F.layer_norm(t32, t32.shape[-1:])
        per_token = (s32 - t32).pow(2).mean(dim=-1)
    else:
        per_token = 1.0 - F.cosine_similarity(s32, t32, dim=-1, eps=1e-8)
    return _normalise(per_token.sum() / len(student_hidden), num_tokens)


def _fusable(projections: Sequence[nn.Module]) -> bool:
    """Bias-free linear maps of one shape: their matmuls can run as one batched matmul."""
    if not all(type(p) is nn.Linear and p.bias is None for p in projections):
        return False
    return len({tuple(p.weight.shape) for p in projections}) == 1  # type: ignore[union-attr]


def _project(student_hidden: list[Tensor], projections: Sequence[nn.Module] | None) -> Tensor:
    """The student's states mapped to the teacher's width, stacked [L, N, d_t].

    The matmuls run in the compute dtype (autocast's when it is on, as KDTrainer's loss runs under mixed
    precision, else the states' dtype), the weights cast to it per step: trainable fp32 projections stay fp32
    master weights while the work runs at bf16 speed. Bias-free linear projections of one shape (what
    `make_projections` builds) run as one batched matmul.
    """
    if projections is None:
        if len({tuple(h.shape) for h in student_hidden}) != 1:
            raise ValueError("student hidden states of different shapes need projections")
        return torch.stack(student_hidden)
    device = student_hidden[0].device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else student_hidden[0].dtype
    if _fusable(projections) and len({tuple(h.shape) for h in student_hidden}) == 1:
        states = torch.stack(student_hidden).to(dtype)
        weights = torch.stack([p.weight for p in projections]).to(dtype)  # type: ignore[misc]
        return torch.bmm(states, weights.transpose(1, 2))
    out = []
    for proj, h_s in zip(projections, student_hidden, strict=True):
        weight = next(proj.parameters(), None)
        if isinstance(proj, nn.Linear):
            out.append(F.linear(h_s.to(dtype), proj.weight.to(dtype),
                                None if proj.bias is None else proj.bias.to(dtype)))
        else:  # any other module: fed in its own dtype
            out.append(proj(h_s if weight is None else h_s.to(weight.dtype)))
    if len({tuple(h.shape) for h in out}) != 1:
        raise ValueError(f"projected student states differ in shape: {[tuple(h.shape) for h in out]}")
    return torch.stack(out)


def _round_half_up(num: int, den: int) -> int:
    # Integer rounding; Python's round() is banker's rounding and would be less predictable.
    return (2 * num + den) // (2 * den)


def uniform_layer_map(
    num_student_layers: int,
    num_teacher_layers: int,
    num_pairs: int | None = None,
    include_embedding: bool = False,
) -> list[tuple[int, int]]:
    """Evenly spaced (student, teacher) pairs of ``hidden_states`` indices.

    Index convention (HF ``output_hidden_states=True``): 0 = embedding output, i = output of
    block i (1-based), L = last block. Note that HF Llama-style models store the *final-norm*
    output as the last element (it equals ``last_hidden_state``), so pairs ending at L compare
    normalised states on both sides.

    Student layers are ``round(j * S / num_pairs)`` for ``j = 1..num_pairs`` (default: all S
    blocks) and student layer ``s`` maps to teacher layer ``round(s * L_t / S)`` (half-up, at
    least 1), so the last block maps to the last block and index 0 is never used unless
    ``include_embedding`` prepends ``(0, 0)``.
    """
    s_layers, t_layers = num_student_layers, num_teacher_layers
    if s_layers < 1 or t_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got student={s_layers}, teacher={t_layers}")
    n = s_layers if num_pairs is None else num_pairs
    if not 1 <= n <= s_layers:
        raise ValueError(f"num_pairs must be in [1, {s_layers}], got {num_pairs}")
    pairs = [(0, 0)] if include_embedding else []
    for j in range(1, n + 1):
        s = _round_half_up(j * s_layers, n)
        pairs.append((s, max(1, _round_half_up(s * t_layers, s_layers))))
    return pairs


def resolve_layer_map(
    spec: str | Sequence[Sequence[int]],
    num_student_layers: int,
    num_teacher_layers: int,
) -> list[tuple[int, int]]:
    """Turn a config layer-map spec into validated (student, teacher) ``hidden_states`` indices.

    ``spec`` is "uniform" (see :func:`uniform_layer_map`), "last" (``[(S, L_t)]``) or an explicit
    list of ``[student, teacher]`` pairs with ``0 <= student <= S`` and ``0 <= teacher <= L_t``.
    """
    s_layers, t_layers = num_student_layers, num_teacher_layers
    if isinstance(spec, str):
        if spec == "uniform":
            return uniform_layer_map(s_layers, t_layers)
        if spec == "last":
            return [(s_layers, t_layers)]
        raise ValueError(f"layer map must be 'uniform', 'last' or a list of pairs, got {spec!r}")
    ranges = f"valid: student 0..{s_layers}, teacher 0..{t_layers}"
    pairs: list[tuple[int, int]] = []
    for pair in spec:
        ok = (
            isinstance(pair, Sequence)
            and not isinstance(pair, str)
            and len(pair) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
        )
        if not ok:
            raise ValueError(f"layer pair {pair!r} is not a [student, teacher] pair of ints ({ranges})")
        s, t = pair
        if not (0 <= s <= s_layers and 0 <= t <= t_layers):
            raise ValueError(f"layer pair {[s, t]} out of range ({ranges})")
        pairs.append((s, t))
    if not pairs:
        raise ValueError(f"explicit layer map is empty ({ranges})")
    return pairs


def make_projections(
    pairs: Sequence[tuple[int, int]],
    student_width: int,
    teacher_width: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> nn.ModuleList:
    """One bias-free ``nn.Linear(student_width, teacher_width)`` per layer pair, with ``dtype`` weights.

    Identity-initialised when the widths match (so training starts from plain matching),
    default PyTorch init otherwise. Trained projections are best kept fp32 (master weights: AdamW steps
    smaller than bf16's resolution would be lost); :func:`feature_loss` runs their matmuls in the student's
    compute dtype either way.
    """
    projections = nn.ModuleList()
    for _ in pairs:
        linear = nn.Linear(student_width, teacher_width, bias=False, dtype=dtype)
        if student_width == teacher_width:
            with torch.no_grad():
                linear.weight.copy_(torch.eye(student_width))
        projections.append(linear)
    return projections


def derived_layer_map(teacher_layers: Sequence[int], num_teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) ``hidden_states`` pairs for a student derived from the teacher's blocks.

    Student block ``j`` (0-based) is a copy of teacher block ``teacher_layers[j]``, so the student's output
    of block ``j`` (index ``j + 1``) is paired with that teacher block's output (index
    ``teacher_layers[j] + 1``).
    HF Llama-style models return the *final-norm* output as their last hidden state; when the student's last
    block was not the teacher's last, that pair would compare a normed with an un-normed state, so it is left
    out.
    """
    layers = list(teacher_layers)
    if not layers or any(not 0 <= t < num_teacher_layers for t in layers):
        raise ValueError(
            f"derived student layers {layers} must be teacher blocks 0..{num_teacher_layers - 1}"
        )
    pairs = [(j + 1, t + 1) for j, t in enumerate(layers)]
    if layers[-1] != num_teacher_layers - 1:
        pairs.pop()
    if not pairs:
        raise ValueError(f"derived student layers {layers}: no layer pair left to match")
    return pairs
