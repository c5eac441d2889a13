"""Cost of the cross-tokenizer losses: forward + backward of kd1's plain forward KL (one tokenizer), ULD and
hybrid (kdlab.cross_tokenizer) over the same answer rows, with a live teacher (every token) and a cached one
(top-k + tail). Vocabularies of a Llama-3-size teacher and a SmolLM2-size student by default.

    python bench/cross_tokenizer_loss.py                      # 128 rows, V_S 49,152, V_T 128,256
    python bench/cross_tokenizer_loss.py --rows 512 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import add_device_argument, machine_line, synchronize

from kdlab import losses
from kdlab.cross_tokenizer import cached_head, full_head, hybrid_loss, uld_loss


def timed(fn, device: str, repeats: int) -> float:
    """Median milliseconds of `fn()` (forward + backward), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128, help="answer rows (aligned pairs) per batch")
    parser.add_argument("--student-vocab", type=int, default=49_152)
    parser.add_argument("--teacher-vocab", type=int, default=128_256)
    parser.add_argument("--matched", type=float, default=0.6, help="share of the student vocabulary matched")
    parser.add_argument("--top-k", type=int, default=32, help="the cached teacher's k")
    parser.add_argument("--repeats", type=int, default=5)
    add_device_argument(parser)
    args = parser.parse_args()
    device, n, vs, vt, t = args.device, args.rows, args.student_vocab, args.teacher_vocab, 2.0
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(n, vs, generator=g) * 3).to(device).requires_grad_(True)
    teacher = (torch.randn(n, vt, generator=g) * 3).to(device)
    same_teacher = (torch.randn(n, vs, generator=g) * 3).to(device)
    m = int(args.matched * vs)
    table = torch.full((vt,), -1, dtype=torch.long)
    table[torch.randperm(vt, generator=g)[:m]] = torch.randperm(vs, generator=g)[:m]
    mask = torch.zeros(vs, dtype=torch.bool)
    mask[table[table >= 0]] = True
    table, mask = table.to(device), mask.to(device)
    logp = torch.log_softmax(teacher, dim=-1)
    top = logp.topk(args.top_k, dim=-1)
    tail = torch.logsumexp(logp.scatter(1, top.indices, float("-inf")) / t, dim=-1)
    live, cached = full_head(teacher, t), cached_head(top.indices, top.values, tail, t)

    def step(loss_fn):
        def run():
            student.grad = None
            loss_fn().backward()
        return run

    cases = {
        "kd1 forward KL, one tokenizer (live)": lambda: losses.kd_divergence_full(
            student, same_teacher, temperature=t, divergence="forward_kl", num_tokens=n),
        "uld (live)": lambda: uld_loss(student, *live, temperature=t, num_tokens=n),
        "uld (cached)": lambda: uld_loss(student, *cached, temperature=t, num_tokens=n),
        "hybrid (live)": lambda: hybrid_loss(student, *live, teacher_to_student=table, student_matched=mask,
                                             temperature=t, num_tokens=n),
        "hybrid (cached)": lambda: hybrid_loss(student, *cached, teacher_to_student=table,
                                               student_matched=mask, temperature=t, num_tokens=n),
    }
    print(machine_line(device))
    print(f"{n} rows, student vocabulary {vs:,}, teacher {vt:,} ({m:,} matched), cached top-{args.top_k}; "
          f"forward + backward, median of {args.repeats}")
    base = None
    for name, fn in cases.items():
        ms = timed(step(fn), device, args.repeats)
        base = base or ms
        print(f"  {name:40s} {ms:9.1f} ms  ({ms / base:.1f}x kd1)")


if __name__ == "__main__":
    main()
