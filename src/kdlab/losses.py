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
* Distillation divergences are multiplied by ``T**2`` (Hinton et al., 2015) so that gradient
  magnitudes do not shrink as the temperature grows.
* ``p`` always denotes the teacher, ``q`` the student:
  ``forward_kl = KL(p || q)``, ``reverse_kl = KL(q || p)``,
  ``jsd = beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``
  (generalized JSD of Agarwal et al., 2024, "GKD"); ``beta = 0.5`` is the standard JSD, bounded by
  ``ln 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
FEATURE_KINDS = ("mse", "cosine")

# Floor on the teacher's tail mass when tail tokens exist (k < V). fp16 log-probs cannot resolve
# tail masses much below ~1e-4, and an exact zero would make reverse KL infinite.
DEFAULT_MIN_TAIL_MASS = 1e-6

_NumTokens = int | float | Tensor


# --------------------------------------------------------------------------- helpers


def _check_common(temperature: float, divergence: str, beta: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        # beta in {0, 1} makes the mixture collapse onto one side and the loss identically 0.
        raise ValueError(f"jsd beta must be in the open interval (0, 1), got {beta}")


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


def _divergence_rows(log_p: Tensor, log_q: Tensor, divergence: str, beta: float) -> Tensor:
    """Per-row divergence between teacher ``log_p`` and student ``log_q`` (both [N, K], fp32)."""
    if divergence == "forward_kl":
        return _kl_rows(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl_rows(log_q, log_p)
    # log m via logsumexp so tiny p and q do not underflow to log(0). Entries outside both supports
    # are set to 0 first: logsumexp of all -inf has a NaN gradient (they contribute 0 to the KLs).
    outside = torch.isneginf(log_p) & torch.isneginf(log_q)
    log_m = torch.logsumexp(
        torch.stack(
            [
                log_p.masked_fill(outside, 0.0) + math.log(beta),
                log_q.masked_fill(outside, 0.0) + math.log1p(-beta),
            ]
        ),
        dim=0,
    )
    return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)


# --------------------------------------------------------------------------- KD on logits


def kd_divergence_full(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    divergence: str,
    beta: float = 0.5,
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
        divergence: "forward_kl", "reverse_kl" or "jsd".
        beta: mixture weight of the teacher for "jsd", in (0, 1); ignored otherwise.
        num_tokens: answer tokens in the global batch (see module doc).
    """
    _check_common(temperature, divergence, beta)
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
    per_row = _divergence_rows(log_p, log_q, divergence, beta)
    return _normalise(per_row.sum() * temperature**2, num_tokens)


def teacher_tail_mass(topk_logprobs: Tensor) -> Tensor:
    """Teacher probability mass outside its top-k: ``1 - sum_i exp(logp_i)``, clamped to [0, 1].

    [N, k] log-probs (any float dtype) -> [N] float32. Computed as ``-expm1(logsumexp(logp))``,
    which stays accurate for confident teachers where the naive ``1 - sum`` would cancel.
    """
    log_listed = torch.logsumexp(topk_logprobs.detach().float(), dim=-1)
    return (-torch.expm1(log_listed)).clamp(min=0.0, max=1.0)


def _topk_buckets(
    student_logits: Tensor,
    topk_indices: Tensor,
    topk_logprobs: Tensor,
    temperature: float,
    min_tail_mass: float,
) -> tuple[Tensor, Tensor]:
    """Return teacher and student log-probabilities over k (+1 tail) buckets, both [N, k(+1)]."""
    vocab = student_logits.shape[-1]
    k = topk_indices.shape[-1]
    idx = topk_indices.to(torch.int64)
    t_logp = topk_logprobs.detach().float()
    valid = ~torch.isneginf(t_logp)
    has_tail = k < vocab  # static: no tail bucket when every token is listed

    # Student: top-k entries the teacher marks impossible (-inf) are dropped from the support,
    # consistent with kd_divergence_full; everything not listed forms the tail bucket.
    s = student_logits.float() / temperature
    s_top = s.gather(1, idx).masked_fill(~valid, float("-inf"))
    log_norm = torch.logsumexp(s.scatter(1, idx, s_top), dim=-1, keepdim=True)
    s_log = s_top - log_norm
    # Teacher: tempered weights exp(logp_i / T); the tail counts as one token of mass tail^(1/T).
    t_w = t_logp / temperature
    if has_tail:
        s_tail = torch.logsumexp(s.scatter(1, idx, float("-inf")), dim=-1, keepdim=True)
        s_log = torch.cat([s_log, s_tail - log_norm], dim=-1)
        tail = teacher_tail_mass(t_logp).unsqueeze(-1).clamp(min=min_tail_mass)
        t_w = torch.cat([t_w, tail.log() / temperature], dim=-1)
    t_log = F.log_softmax(t_w, dim=-1)
    return t_log, s_log


def kd_divergence_topk(
    student_logits: Tensor,
    topk_indices: Tensor,
    topk_logprobs: Tensor,
    *,
    temperature: float,
    divergence: str,
    beta: float = 0.5,
    num_tokens: _NumTokens,
    min_tail_mass: float = DEFAULT_MIN_TAIL_MASS,
) -> Tensor:
    """Distillation divergence against a teacher stored as its top-k log-probabilities.

    Both distributions are collapsed onto ``k + 1`` buckets: the ``k`` listed tokens and one tail
    bucket holding every other token. The divergence over the buckets is multiplied by ``T**2``,
    summed over rows and divided by ``num_tokens``.

    Teacher buckets. ``topk_logprobs`` are teacher log-probs at temperature 1. The tail mass
    ``t = 1 - sum_i exp(logp_i)`` is derived (clamped to ``[min_tail_mass, 1]``; the floor avoids
    an infinite reverse KL when fp16 rounding makes the listed mass reach 1). Tempered buckets:
    ``p_i = exp(logp_i / T) / Z`` and ``p_tail = t**(1/T) / Z``, with ``Z`` normalising the k + 1
    buckets. Treating the tail as a single token is an **approximation** for ``T != 1``: the true
    tempered tail mass is ``sum_j p_j**(1/T)`` over the unknown tail tokens, which for ``T > 1``
    lies between this value (all tail mass on one token) and ``(V-k)**(1-1/T) * t**(1/T)`` (tail
    spread uniformly). It is exact at ``T = 1``.

    Student buckets. ``q = softmax(student / T)``; ``q_i`` is read at the listed indices and
    ``q_tail`` is the mass of the other tokens, computed as a logsumexp over the non-listed logits
    (no ``1 - sum`` cancellation).

    When ``k == V`` there is no tail bucket, the teacher is renormalised over the listed tokens,
    and the result equals :func:`kd_divergence_full` (up to fp rounding) for any ``T``.

    Args:
        student_logits: [N, V] student logits of the scored positions.
        topk_indices: [N, k] token ids, any integer dtype (uint16/int32/int64); must be distinct
            within a row.
        topk_logprobs: [N, k] teacher log-probabilities at T = 1 (fp16 allowed; computed in
            fp32). ``-inf`` entries mark impossible tokens and are removed from both supports.
        temperature, divergence, beta, num_tokens: as in :func:`kd_divergence_full`.
        min_tail_mass: floor on the derived teacher tail mass (only used when k < V).
    """
    _check_common(temperature, divergence, beta)
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
    if not 0.0 < min_tail_mass < 1.0:
        raise ValueError(f"min_tail_mass must be in (0, 1), got {min_tail_mass}")
    log_p, log_q = _topk_buckets(student_logits, topk_indices, topk_logprobs, temperature, min_tail_mass)
    per_row = _divergence_rows(log_p, log_q, divergence, beta)
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
    num_tokens: _NumTokens,
) -> Tensor:
    """Hidden-state matching loss summed over mapped layer pairs.

    Element ``l`` of the lists is one layer pair: student ``[N, d_s]`` and teacher ``[N, d_t]``,
    rows already restricted to the real scored tokens (same rows, same order). The student is
    mapped by ``projections[l]`` (``None``: identity, needs ``d_s == d_t``). The teacher is
    detached and cast to the student's dtype; the reduction runs in fp32.

    * ``kind="mse"``: squared error averaged over the feature dim, summed over tokens.
    * ``kind="cosine"``: ``1 - cos(proj(h_s), h_t)`` summed over tokens.

    Each layer's sum is divided by ``num_tokens`` and the layers are summed (not averaged), so
    the scale grows with the number of pairs; pick the weight ``lam`` accordingly.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(
            "need the same, non-zero number of student and teacher hidden states, got "
            f"{len(student_hidden)} and {len(teacher_hidden)}"
        )
    if projections is not None and len(projections) != len(student_hidden):
        raise ValueError(f"got {len(projections)} projections for {len(student_hidden)} layer pairs")
    total: Tensor | None = None
    for layer, (h_s, h_t) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
        if projections is not None:
            proj = projections[layer]
            weight = next(proj.parameters(), None)
            # Projections are often kept in fp32 while the student runs in bf16.
            h_s = proj(h_s if weight is None else h_s.to(weight.dtype))
        if h_s.shape != h_t.shape:
            raise ValueError(
                f"layer pair {layer}: projected student {tuple(h_s.shape)} vs teacher {tuple(h_t.shape)}"
            )
        h_t = h_t.detach().to(h_s.dtype)
        s32, t32 = h_s.float(), h_t.float()
        if kind == "mse":
            per_token = (s32 - t32).pow(2).mean(dim=-1)
        else:
            per_token = 1.0 - F.cosine_similarity(s32, t32, dim=-1, eps=1e-8)
        layer_sum = per_token.sum()
        total = layer_sum if total is None else total + layer_sum
    assert total is not None
    return _normalise(total, num_tokens)


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
    pairs: Sequence[tuple[int, int]], student_width: int, teacher_width: int
) -> nn.ModuleList:
    """One bias-free ``nn.Linear(student_width, teacher_width)`` per layer pair.

    Identity-initialised when the widths match (so training starts from plain matching),
    default PyTorch init otherwise.
    """
    projections = nn.ModuleList()
    for _ in pairs:
        linear = nn.Linear(student_width, teacher_width, bias=False)
        if student_width == teacher_width:
            with torch.no_grad():
                linear.weight.copy_(torch.eye(student_width))
        projections.append(linear)
    return projections
