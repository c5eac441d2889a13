"""fp32 vs bf16 autocast on this CPU: one full fine-tuning step (forward, backward, AdamW) and one inference
forward of the demo's student shape (SmolLM2-135M with 24 of its 30 blocks). Prints seconds per call.

    python bench/bf16_step.py                 # batch 8 x 256 tokens (a SQuAD training batch), 2 threads
    python bench/bf16_step.py --tokens 64     # an SST-2-sized batch
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine_line

from kdlab.models import derive_student, load_model, resolve_model_path

DEMO_BLOCKS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_model(resolve_model_path("smollm2-135m-instruct"))
    student = derive_student(teacher, DEMO_BLOCKS)
    del teacher
    x = torch.randint(0, student.config.vocab_size, (args.batch_size, args.tokens))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    print(machine_line("cpu"))
    print(f"student {len(DEMO_BLOCKS)} blocks, batch {args.batch_size} x {args.tokens} tokens, "
          f"{args.threads} threads; median of {args.repeats} after one warm-up")
    for mode in ("fp32", "bf16"):
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                loss = student(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        print(f"train step, {mode}: {statistics.median(times[1:]):.2f} s")
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            student.to(dtype)
            times = []
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                student(input_ids=x)
                times.append(time.perf_counter() - start)
            print(f"forward, {str(dtype).removeprefix('torch.')}: {statistics.median(times[1:]):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
