"""One run on every core, or one run per core? The training-step throughput behind `executor.workers`.

Times full fine-tuning steps of the demo student's shape (SmolLM2-135M, 24 blocks, random weights; batch 8,
bf16 autocast on CPU, AdamW) in three ways: one process with all the cores as torch threads, one process with
one thread, and one one-thread process per core side by side. Prints seconds per step and the throughput of
each way relative to the first (docs/demo.md section 7).

    python bench/thread_split.py              # 64-token sequences, 8 steps (2 warm-up)
    python bench/thread_split.py --tokens 128
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
from _common import machine_line

from kdlab.local_workers import available_cores


def step_seconds(threads: int, tokens: int, steps: int) -> float:
    """Mean seconds per training step after two warm-up steps, in this process with `threads` threads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=24,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, config.vocab_size, (8, tokens))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return sum(times[2:]) / len(times[2:])


def in_subprocesses(count: int, tokens: int, steps: int) -> list[float]:
    """`count` one-thread processes side by side; each one's seconds per step."""
    cmd = [sys.executable, __file__, "--child", "--tokens", str(tokens), "--steps", str(steps)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="sequence length (default 64)")
    parser.add_argument("--steps", type=int, default=8, help="steps per measurement, 2 of them warm-up")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(step_seconds(1, args.tokens, args.steps))
        return
    cores = available_cores()
    print(machine_line())
    all_cores = step_seconds(cores, args.tokens, args.steps)
    one = step_seconds(1, args.tokens, args.steps)
    side_by_side = in_subprocesses(cores, args.tokens, args.steps)
    print(f"one process, {cores} threads: {all_cores:.3f} s/step (throughput 1.00x)")
    print(f"one process, 1 thread: {one:.3f} s/step (throughput {all_cores / one:.2f}x)")
    per_step = ", ".join(f"{s:.3f}" for s in side_by_side)
    throughput = sum(all_cores / s for s in side_by_side)
    print(f"{cores} one-thread processes side by side: {per_step} s/step each (throughput {throughput:.2f}x)")


if __name__ == "__main__":
    main()
