"""Training step time: SFT vs KD1 (top-k from a TeacherCache) vs KD3 (cached hidden states, uniform layer
map) vs the on-policy GKD and OPD (the student samples each step's answers, a live teacher scores them), same
student, same batch. Target: KD1 and KD3 within 1.15x of SFT. On-policy steps are split into rollout (the
student's sampling), teacher (its forward on the samples) and student (forward, loss, backward, AdamW) time.

A step is what the Trainer does per batch: the collator (cache look-ups included), `KDTrainer.training_step`
(forward through `forward_scored`, the method's loss, backward), gradient clipping and the AdamW step. The
methods take turns step by step, so drifting background load hits all of them alike.

    python bench/kd_step.py            # SmolLM2-135M teacher (30 layers), 10-layer derived student
    python bench/kd_step.py --tiny     # tiny models, seconds
    python bench/kd_step.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    PARAMS,
    add_device_argument,
    encode_sst2,
    machine_line,
    sst2_like_examples,
    step_runner,
    teacher_and_student,
    verdict,
)

from kdlab import losses
from kdlab.config import LoraSettings
from kdlab.models import add_lora
from kdlab.seeding import configure_determinism
from kdlab.stages.cache import build_teacher_cache
from kdlab.training import TrainItem

METHODS = ("sft", "kd1", "kd3", "gkd", "opd")  # the methods this bench times
ON_POLICY = ("gkd", "opd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny teacher (6 layers) and a 2-layer student")
    p.add_argument("--student-layers", type=int, help="derived student depth (default 10, tiny 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--words", type=int, default=30, help="words per review (30: about 40 prompt tokens)")
    p.add_argument("--top-k", type=int, default=32, help="KD1 cache k")
    p.add_argument("--finetune", choices=["full", "lora"], default="full",
                   help="student fine-tuning (the demo preset trains its derived student fully)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per method (median reported)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels, as the study's `deterministic: true` (to measure its cost)")
    p.add_argument("--target", type=float, default=1.15, help="largest KD/SFT step-time ratio that passes")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="rows to time (sft always runs: the ratios are to it)")
    add_device_argument(p)
    args = p.parse_args(argv)
    args.methods = ["sft", *[m for m in args.methods if m != "sft"]]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    depth = args.student_layers or (2 if args.tiny else 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    configure_determinism(args.deterministic)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="kd_step-") as tmp:
        work = Path(tmp)
        teacher, student, tokenizer, kept = teacher_and_student(args.tiny, depth, work)
        teacher, student = teacher.to(args.device), student.to(args.device)
        examples = sst2_like_examples(args.batch_size, words=args.words)
        task, encoded = encode_sst2(examples, tokenizer)
        items = [TrainItem(gold=encoded[ex.id]) for ex in examples if ex.id in encoded]
        pairs = losses.resolve_layer_map("uniform", student.config.num_hidden_layers,
                                         teacher.config.num_hidden_layers)
        start = time.perf_counter()
        # One cache holding both signals, built by the study's own builder from real teacher passes.
        cache = build_teacher_cache(
            work / "cache", task=task, teacher=teacher, tokenizer=tokenizer, examples=examples,
            encoded=encoded, fingerprint_inputs={"bench": "kd_step"}, top_k=args.top_k,
            hidden_layers=sorted({t for _, t in pairs}), answers=False, batch_size=args.batch_size,
            temperatures=[PARAMS["kd1"]["temperature"]])
        cache_s = time.perf_counter() - start
        teacher_name = "tiny-llama" if args.tiny else "SmolLM2-135M-Instruct"
        t_layers, width = teacher.config.num_hidden_layers, teacher.config.hidden_size
        live = teacher.eval().requires_grad_(False) if set(args.methods) & set(ON_POLICY) else None
        del teacher
        if args.finetune == "lora":
            student = add_lora(student, LoraSettings())
        methods = args.methods
        runners = {name: step_runner(name, student, pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                                     cache=cache, pairs=pairs, teacher_width=width, workdir=work,
                                     device=args.device,
                                     params=dict(PARAMS[name], top_k=args.top_k) if name == "kd1" else None,
                                     live_teacher=live if name in ON_POLICY else None, tokenizer=tokenizer)
                   for name in methods}
        for _ in range(args.warmup):
            for name in methods:
                runners[name].step(items)
        times: dict[str, list[float]] = {name: [] for name in methods}
        parts: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}  # rollout, teacher
        for _ in range(args.repeats):
            for name in methods:  # round-robin: drift in background load hits every method alike
                cost = runners[name].trainer.cost
                before = (cost["rollout_seconds"], cost["teacher_seconds"])
                times[name].append(runners[name].step(items))
                parts[name].append((cost["rollout_seconds"] - before[0], cost["teacher_seconds"] - before[1]))

    n_params = sum(p.numel() for p in student.parameters())
    prompt_tokens = [len(e.input_ids) for e in encoded.values()]
    answer_tokens = sum(sum(1 for x in e.labels if x != -100) for e in encoded.values())
    print("\nkd_step: training step time with a cached teacher (collate + forward + loss + backward + clip + "
          "AdamW step)")
    print(machine_line(args.device))
    print(f"teacher {teacher_name} ({t_layers} layers), student of teacher blocks {kept} "
          f"({n_params / 1e6:.1f}M parameters, {args.finetune} fine-tune)")
    print(f"batch {len(items)} x {min(prompt_tokens)}-{max(prompt_tokens)} tokens, {answer_tokens} answer "
          f"tokens; cache: top-{args.top_k} + hidden states of teacher layers {[t for _, t in pairs]}, "
          f"built in {cache_s:.1f}s")
    print(f"deterministic kernels: {'on' if args.deterministic else 'off'}")
    print(f"warm-up {args.warmup}, then {args.repeats} timed steps per method, round-robin")
    sft = statistics.median(times["sft"])
    print(f"\n{'method':<8}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'vs SFT':>9}{'paired':>9}"
          f"{'rollout':>10}{'teacher':>10}{'student':>10}")
    ratios = {}
    for name in methods:
        med = statistics.median(times[name])
        ratios[name] = med / sft
        # Median of per-round ratios: each compares steps taken seconds apart, so slow drift cancels.
        paired = statistics.median(t / s for t, s in zip(times[name], times["sft"], strict=True))
        rollout = statistics.median(r for r, _ in parts[name])
        teacher_s = statistics.median(t for _, t in parts[name])
        student_s = statistics.median(t - r - te for t, (r, te) in zip(times[name], parts[name], strict=True))
        print(f"{name:<8}{med * 1e3:>11.1f}{min(times[name]) * 1e3:>9.1f}{max(times[name]) * 1e3:>9.1f}"
              f"{ratios[name]:>8.3f}x{paired:>8.3f}x{rollout * 1e3:>10.1f}{teacher_s * 1e3:>10.1f}"
              f"{student_s * 1e3:>10.1f}")
    print("(vs SFT: ratio of medians; paired: median over rounds of step time / that round's SFT step;\n"
          " rollout / teacher / student: median ms per step of the student's sampling, the live teacher's\n"
          " forward passes, and the rest: the student's forward, loss, backward and AdamW step)\n")
    for name in [m for m in ("kd1", "kd3") if m in methods]:
        ok = ratios[name] <= args.target
        print(f"target {name} step <= {args.target:.2f}x SFT step: {ratios[name]:.3f}x  {verdict(ok)}")
    return 0  # a figure, not a test: the verdict is in the output


if __name__ == "__main__":
    sys.exit(main())
