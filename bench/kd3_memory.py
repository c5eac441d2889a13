"""Peak memory of KD3 training reading teacher hidden states from the cache: a cache of 1,000 vs 8,000
examples, the same student and steps. Target: the peak RSS stays flat within 10% (the cache is
memory-mapped, so only the rows of each batch are read, whatever the cache holds).

Each size runs in a fresh subprocess whose RSS high-water mark is the figure: it loads the student, opens
the cache and takes KD3 training steps (TrainCollator cache reads, KDTrainer.training_step, AdamW) on
batches drawn at random from the whole cache. The synthetic hidden states are written with
TeacherCacheWriter at the teacher's width for the uniform layer map's teacher layers.

    python bench/kd3_memory.py           # 10-layer student derived from SmolLM2-135M (30 layers, width 576)
    python bench/kd3_memory.py --tiny    # 2-layer student of a 6-layer tiny Llama
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import (
    add_device_argument,
    encode_sst2,
    machine_line,
    sst2_like_example,
    step_runner,
    teacher_and_student,
    verdict,
)

from kdlab import losses
from kdlab.models import folder_size_bytes, load_model, load_tokenizer, save_model
from kdlab.tasks import SST2Settings, SST2Task
from kdlab.tasks.base import target_ids
from kdlab.teacher_cache import TeacherCache, TeacherCacheWriter
from kdlab.training import TrainItem


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny teacher (6 layers) and a 2-layer student")
    p.add_argument("--student-layers", type=int, help="derived student depth (default 10, tiny 2)")
    p.add_argument("--sizes", type=int, nargs=2, default=[1000, 8000], metavar=("SMALL", "LARGE"),
                   help="cached examples of the two caches")
    p.add_argument("--steps", type=int, default=8, help="KD3 training steps per run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden-dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--threads", type=int, help="torch CPU threads in the runs (default: torch's choice)")
    p.add_argument("--target", type=float, default=0.10,
                   help="largest relative change of peak RSS that passes")
    add_device_argument(p)
    # Internal: one measured run (what the parent starts per size).
    p.add_argument("--child", nargs=3, metavar=("CACHE", "STUDENT", "PAIRS_JSON"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_cache(directory: Path, *, examples: int, layers: list[int], width: int, rows: dict[int, int],
                hidden_dtype: str) -> None:
    """Hidden states for `examples` SST-2-like ids; `rows[label]` answer tokens each (the gold target's)."""
    rng = np.random.default_rng(0)
    with TeacherCacheWriter(directory, fingerprint_inputs={"bench": "kd3_memory", "n": examples},
                            vocab_size=1 << 16, top_k=None, hidden_layers=layers, hidden_size=width,
                            hidden_dtype=hidden_dtype) as writer:
        for i in range(examples):
            m = rows[i % 2]
            hidden = {t: rng.standard_normal((m, width), dtype=np.float32) for t in layers}
            writer.add(f"train-{i}", hidden=hidden)


def child(args: argparse.Namespace) -> int:
    """One measured run; prints a JSON line with the RSS figures."""
    cache_dir, student_dir, pairs_json = args.child
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(student_dir)
    student = load_model(student_dir, device=args.device)
    pairs = [tuple(p) for p in json.loads(pairs_json)]
    cache = TeacherCache.open(cache_dir)
    with tempfile.TemporaryDirectory(prefix="kd3_memory-") as tmp:
        runner = step_runner("kd3", student, pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                             cache=cache, pairs=pairs, teacher_width=cache.hidden_size, workdir=Path(tmp),
                             device=args.device)
        rss_setup = _rss_now()
        rng = random.Random(0)
        start = time.perf_counter()
        for _ in range(args.steps):
            # A fresh batch from anywhere in the cache each step, encoded as the study encodes it.
            chosen = [sst2_like_example(i) for i in rng.sample(range(len(cache)), args.batch_size)]
            _, encoded = encode_sst2(chosen, tokenizer)
            runner.step([TrainItem(gold=encoded[ex.id]) for ex in chosen])
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"peak_rss": peak, "rss_after_setup": rss_setup, "seconds": seconds}))
    return 0


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    depth = args.student_layers or (2 if args.tiny else 10)
    if args.threads:
        torch.set_num_threads(args.threads)  # the runs get the same setting; the machine line shows it
    with tempfile.TemporaryDirectory(prefix="kd3_memory-") as tmp:
        work = Path(tmp)
        teacher, student, tokenizer, kept = teacher_and_student(args.tiny, depth, work)
        t_layers, width = teacher.config.num_hidden_layers, teacher.config.hidden_size
        del teacher
        save_model(student, tokenizer, work / "student")  # the runs load it; no teacher in their memory
        n_params = sum(p.numel() for p in student.parameters())
        del student
        pairs = losses.resolve_layer_map("uniform", depth, t_layers)
        layers = sorted({t for _, t in pairs})
        task = SST2Task(SST2Settings(max_length=128))
        rows = {label: len(target_ids(task.answer_target(label), tokenizer)) for label in (0, 1)}
        results = {}
        for n in args.sizes:
            directory = work / f"cache-{n}"
            start = time.perf_counter()
            write_cache(directory, examples=n, layers=layers, width=width, rows=rows,
                        hidden_dtype=args.hidden_dtype)
            built = time.perf_counter() - start
            cmd = [sys.executable, __file__, "--child", str(directory), str(work / "student"),
                   json.dumps(pairs), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--device", args.device]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"kd3_memory: the run with {n} cached examples failed")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            results[n] = {**figures, "cache_bytes": folder_size_bytes(directory), "build_s": built}

    print("\nkd3_memory: peak RSS of KD3 training steps reading hidden states from a memory-mapped cache")
    print(machine_line(args.device))
    print(f"student: {depth} layers {kept} of {'tiny-llama' if args.tiny else 'SmolLM2-135M-Instruct'} "
          f"({n_params / 1e6:.1f}M parameters, full fine-tune), {len(pairs)} layer pairs {pairs}")
    print(f"cache: {args.hidden_dtype} hidden states of width {width}, {rows[0]}-{rows[1]} answer tokens per "
          f"example; {args.steps} steps of batch {args.batch_size} drawn from the whole cache, fresh process "
          f"per size")
    mib = 1 << 20
    print(f"\n{'examples':>9}{'cache MiB':>11}{'RSS after setup MiB':>21}{'peak RSS MiB':>14}{'steps s':>9}")
    for n, r in results.items():
        print(f"{n:>9}{r['cache_bytes'] / mib:>11.1f}{r['rss_after_setup'] / mib:>21.1f}"
              f"{r['peak_rss'] / mib:>14.1f}{r['seconds']:>9.1f}")
    small, large = (results[n]["peak_rss"] for n in args.sizes)
    ratio = large / small
    ok = abs(ratio - 1.0) <= args.target
    print(f"\ntarget peak RSS flat within {args.target:.0%} ({args.sizes[1]} vs {args.sizes[0]} examples): "
          f"{ratio:.3f}x  {verdict(ok)}")
    return 0  # a figure, not a test: the verdict is in the output


if __name__ == "__main__":
    sys.exit(main())
