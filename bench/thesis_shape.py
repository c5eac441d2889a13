"""The thesis study's shapes at full size on one device, with random weights built on the device (nothing is
downloaded): a TinyLlama-1.1B-architecture student with LoRA r16 on q,k,v,o and a Llama-2-7B-architecture
teacher, bf16, batch 16 of ~300-token prompts + 12-28-token answers. Each row times kdlab's own training step
(`KDTrainer.training_step` + clip + AdamW, the collator's cache reads included) or its batched generation.

Rows: sft, kd1 cached (k=32), kd1 online, kd3 cached (uniform map, 22 pairs), kd3 online, sft + gradient
checkpointing, sft packed (padding-free), trl_gkd (TRL's generalized JSD loss on full-sequence logits, when
`trl` is importable), generation and generation_static (answers/s, hf backend, dynamic / static KV cache).
Each row: ms/step, real tokens/s, MFU and peak memory.

MFU = 6 * N_student * T / t / peak, N_student the student's parameter count (base + LoRA), T the real
(non-pad) tokens of the batch, t seconds per step, peak the device's dense bf16 FLOP/s (`--peak-tflops`,
default 989: H100/H200 SXM). It counts the student's training FLOPs only (not the teacher's forward); the
issue's figures use the same formula.

Peak memory: torch.cuda.max_memory_allocated per row on CUDA (reset before each row); on CPU the process's
RSS high-water mark so far (it only grows, so later rows show at least the earlier rows' peak).

    python bench/thesis_shape.py --device cuda --json thesis_shape.json
    python bench/thesis_shape.py --tiny --json tiny.json         # CPU, seconds: the same code at toy shapes
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import add_device_argument, machine_line, step_runner, synchronize, verdict
from transformers import AutoModelForCausalLM, LlamaConfig

from kdlab import losses
from kdlab.config import LoraSettings, TrainingSettings
from kdlab.evaluation import GenerationOptions, generate_answers, generation_options
from kdlab.models import add_lora
from kdlab.scored import packing_respected
from kdlab.tasks.base import Encoded
from kdlab.teacher_cache import TeacherCache, TeacherCacheWriter
from kdlab.tiny import build_tiny_tokenizer
from kdlab.training import TrainItem

VOCAB = 32000
STUDENT = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
)  # TinyLlama-1.1B
TEACHER = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
)  # Llama-2-7B
TINY_STUDENT = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
)
TINY_TEACHER = dict(
    hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, intermediate_size=192
)
KD1 = {"lam": 0.5, "temperature": 2.0, "divergence": "forward_kl", "jsd_beta": 0.5, "top_k": 32}
KD3 = {"lam": 0.5, "loss": "mse", "layer_map": "uniform"}
# The figures on one H200 before this work (ms/step; answers/s for generation).
BASELINE = {
    "sft": 156.0,
    "kd1_cached": 140.0,
    "kd1_online": 300.0,
    "kd3_cached": 244.0,
    "kd3_online": 339.0,
    "trl_gkd": 320.0,
    "sft_grad_ckpt": 199.0,
    "generation": 86.0,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy widths and depths, short sequences: CPU seconds")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 16, tiny 4)")
    p.add_argument("--prompt-tokens", type=int, help="mean prompt length (default 300, tiny 24); +-10%%")
    p.add_argument("--warmup", type=int, help="untimed steps per row (default 2, tiny 1)")
    p.add_argument("--repeats", type=int, help="timed steps per row, median reported (default 5, tiny 2)")
    p.add_argument("--gen-batch", type=int, help="generation batch (default 64, tiny 8)")
    p.add_argument("--gen-tokens", type=int, help="new tokens per answer (default 24, tiny 6)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2, ...)")
    p.add_argument("--rows", nargs="*", help="only these rows (names as printed)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device dense bf16 TFLOP/s for MFU")
    p.add_argument("--json", type=Path, help="write the rows and settings as JSON here")
    add_device_argument(p)
    args = p.parse_args(argv)
    tiny = args.tiny
    for name, full, small in (
        ("batch_size", 16, 4),
        ("prompt_tokens", 300, 24),
        ("warmup", 2, 1),
        ("repeats", 5, 2),
        ("gen_batch", 64, 8),
        ("gen_tokens", 24, 6),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    return args


def build(shape: dict[str, int], device: str, attn: str, seed: int) -> torch.nn.Module:
    """A random-weight Llama of `shape`, created directly on `device` in bf16 (no fp32 copy, no download)."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **shape,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model


def batch_items(args: argparse.Namespace) -> list[TrainItem]:
    """Prompts of about `prompt_tokens` (+-10%) and answers of 12-28 tokens (tiny: 3-6), random ids."""
    rng = random.Random(0)
    spread = max(1, args.prompt_tokens // 10)
    lo, hi = (3, 6) if args.tiny else (12, 28)
    items = []
    for i in range(args.batch_size):
        p = rng.randint(args.prompt_tokens - spread, args.prompt_tokens + spread)
        a = rng.randint(lo, hi)
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(p - 1)]
        answer = [rng.randrange(3, VOCAB) for _ in range(a - 1)] + [2]
        items.append(TrainItem(gold=Encoded(f"ex{i}", prompt + answer, [-100] * p + answer)))
    return items


def synthetic_cache(
    directory: Path, items: list[TrainItem], *, layers: list[int], width: int
) -> TeacherCache:
    """Top-32 rows at T=2 and fp16 hidden states at the teacher layers KD3 reads, per answer token (what the
    cache stage writes; the values are random, the reads and shapes are real)."""
    rng = np.random.default_rng(0)
    k = KD1["top_k"]
    with TeacherCacheWriter(
        directory,
        fingerprint_inputs={"bench": "thesis_shape"},
        vocab_size=VOCAB,
        top_k=k,
        hidden_layers=layers,
        hidden_size=width,
        hidden_dtype="float16",
        temperatures=[KD1["temperature"]],
    ) as writer:
        for it in items:
            n = sum(1 for x in it.gold.labels if x != -100)
            idx = np.stack([rng.choice(VOCAB, size=k, replace=False) for _ in range(n)])
            lp = np.sort(rng.normal(-8.0, 2.0, size=(n, k)), axis=-1)[:, ::-1].astype(np.float32)
            tail = np.full(n, -1.0, dtype=np.float32)
            hidden = {t: rng.standard_normal((n, width), dtype=np.float32) for t in layers}
            writer.add(
                it.gold.id,
                topk_indices=idx,
                topk_logprobs=lp,
                topk_tail={KD1["temperature"]: tail},
                hidden=hidden,
            )
    return TeacherCache.open(directory)


def reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: str) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def timed(fn: Callable[[], float], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(fn() for _ in range(repeats))


def trl_gkd_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    items: list[TrainItem],
    device: str,
    optimizer: torch.optim.Optimizer,
) -> Callable[[], float]:
    """TRL's GKD loss as GKDTrainer computes it off-policy (lmbda 0): both models' logits over the whole
    padded sequence, `GKDTrainer.generalized_jsd_loss` at the answer positions, backward, clip, AdamW."""
    try:
        from trl import GKDTrainer
    except ImportError:  # TRL >= 1.0 keeps it among its experimental trainers
        from trl.experimental.gkd import GKDTrainer

    from kdlab.tasks.base import collate

    batch = {
        k: v.to(device)
        for k, v in collate([it.gold for it in items], 0, padding_side="left").items()
        if k != "example_ids"
    }

    def step() -> float:
        synchronize(device)
        begin = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with torch.no_grad():
                t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels=batch["labels"][:, 1:], beta=0.5)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - begin

    return step


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    s_shape, t_shape = (TINY_STUDENT, TINY_TEACHER) if args.tiny else (STUDENT, TEACHER)
    wanted = set(args.rows) if args.rows else None
    started = time.perf_counter()
    student = build(s_shape, device, args.attn, seed=0)
    student = add_lora(
        student,
        LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    teacher = build(t_shape, device, args.attn, seed=1).eval().requires_grad_(False)
    n_student = sum(p.numel() for p in student.parameters())
    n_trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    items = batch_items(args)
    tokens = sum(len(it.gold.input_ids) for it in items)
    padded_tokens = len(items) * max(len(it.gold.input_ids) for it in items)
    pairs = losses.resolve_layer_map("uniform", s_shape["num_hidden_layers"], t_shape["num_hidden_layers"])
    rows: list[dict[str, Any]] = []
    setup_s = time.perf_counter() - started

    def record(name: str, seconds: float, *, train: bool = True, **extra: Any) -> None:
        row: dict[str, Any] = {
            "row": name,
            "ms_per_step": round(seconds * 1e3, 2),
            "peak_gb": round(peak_gb(device), 2),
        }
        if train:
            row["tokens_per_s"] = round(tokens / seconds, 1)
            row["mfu"] = round(6 * n_student * tokens / seconds / (args.peak_tflops * 1e12), 4)
        row.update(extra)
        rows.append(row)
        print(
            f"  {name:<16} {row['ms_per_step']:>10.1f} ms  "
            + "  ".join(f"{k} {v}" for k, v in row.items() if k not in ("row", "ms_per_step")),
            flush=True,
        )

    print(f"\nthesis_shape ({'tiny' if args.tiny else 'thesis'} shapes), built in {setup_s:.1f}s", flush=True)
    with tempfile.TemporaryDirectory(prefix="thesis_shape-") as tmp:
        work = Path(tmp)
        cache = synthetic_cache(
            work / "cache", items, layers=sorted({t for _, t in pairs}), width=t_shape["hidden_size"]
        )
        bf16 = TrainingSettings(bf16=True, warmup_ratio=0.0)
        plans: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
            ("sft", "sft", {}, {}),
            ("kd1_cached", "kd1", KD1, {"cache": cache}),
            ("kd1_online", "kd1", KD1, {"live_teacher": teacher}),
            ("kd3_cached", "kd3", KD3, {"cache": cache}),
            ("kd3_online", "kd3", KD3, {"live_teacher": teacher}),
            (
                "sft_grad_ckpt",
                "sft",
                {},
                {"settings": bf16.model_copy(update={"gradient_checkpointing": True})},
            ),
            ("sft_packed", "sft", {}, {"settings": bf16.model_copy(update={"packing": True})}),
        ]
        for name, method, params, extra in plans:
            if wanted is not None and name not in wanted:
                continue
            settings = extra.pop("settings", bf16)
            if settings.gradient_checkpointing:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if settings.packing and not packing_respected(student):
                record(
                    name, float("nan"), skipped=f"attention {args.attn} does not keep packed sequences apart"
                )
                continue
            reset_peak(device)
            runner = step_runner(
                method,
                student,
                pad_id=0,
                vocab_size=VOCAB,
                cache=extra.get("cache"),
                pairs=pairs,
                teacher_width=t_shape["hidden_size"],
                workdir=work,
                params=params,
                device=device,
                settings=settings,
                live_teacher=extra.get("live_teacher"),
            )
            # accelerate's wrapper is what puts the student's forward under bf16 autocast in a real run.
            runner.module = runner.trainer.accelerator.prepare_model(runner.module)
            seconds = timed(lambda r=runner: r.step(items), args.warmup, args.repeats)
            record(name, seconds, padded_tokens=padded_tokens if not settings.packing else tokens)
            if settings.gradient_checkpointing:
                student.gradient_checkpointing_disable()
            del runner
        if wanted is None or "trl_gkd" in wanted:
            try:
                optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-4)
                reset_peak(device)
                step = trl_gkd_step(student, teacher, items, device, optimizer)
                record("trl_gkd", timed(step, args.warmup, args.repeats))
            except ImportError as e:
                rows.append({"row": "trl_gkd", "skipped": f"trl not importable ({e.name})"})
                print(f"  {'trl_gkd':<16} skipped: trl not importable")
        tokenizer = (
            build_tiny_tokenizer()
        )  # decodes the random ids (unknown ones to ""): the work is the same
        gen_rng = random.Random(1)
        prompts = [
            [1] + [gen_rng.randrange(3, VOCAB) for _ in range(args.prompt_tokens - 1)]
            for _ in range(args.gen_batch)
        ]
        for name, static in (("generation", False), ("generation_static", True)):
            if wanted is not None and name not in wanted:
                continue
            reset_peak(device)

            def gen(static: bool = static) -> float:
                synchronize(device)
                begin = time.perf_counter()
                with generation_options(GenerationOptions(static_cache=static)):
                    generate_answers(
                        teacher, tokenizer, prompts, max_new_tokens=args.gen_tokens, batch_size=args.gen_batch
                    )
                synchronize(device)
                return time.perf_counter() - begin

            seconds = timed(gen, 1, max(1, args.repeats // 2))
            record(
                name,
                seconds,
                train=False,
                answers_per_s=round(len(prompts) / seconds, 1),
                model="teacher",
                batch=args.gen_batch,
                prompt_tokens=args.prompt_tokens,
                new_tokens_max=args.gen_tokens,
            )

    by = {r["row"]: r for r in rows if "ms_per_step" in r}
    if "sft" in by:
        for r in by.values():
            if "mfu" in r:
                r["vs_sft"] = round(r["ms_per_step"] / by["sft"]["ms_per_step"], 3)
    print(f"\n{machine_line(device)}")
    print(
        f"student {n_student / 1e6:.1f}M parameters ({n_trainable / 1e6:.2f}M trainable LoRA r16 q,k,v,o), "
        f"teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M, bf16, attention {args.attn}"
    )
    print(
        f"batch {len(items)} sequences, {tokens} real tokens ({padded_tokens} padded), "
        f"KD3 {len(pairs)} pairs; warm-up {args.warmup}, median of {args.repeats}"
    )
    print(
        "MFU = 6 * N_student * real tokens / step time / "
        f"{args.peak_tflops:g} TFLOP/s (student training FLOPs only)"
    )
    print(
        f"\n{'row':<18}{'ms/step':>9}{'tokens/s':>11}{'MFU':>8}{'vs SFT':>8}{'peak GB':>9}{'answers/s':>11}"
    )
    for r in rows:
        if "skipped" in r:
            print(f"{r['row']:<18} skipped: {r['skipped']}")
            continue
        print(
            f"{r['row']:<18}{r['ms_per_step']:>9.1f}{r.get('tokens_per_s', float('nan')):>11.0f}"
            f"{r.get('mfu', float('nan')):>8.3f}{r.get('vs_sft', float('nan')):>8.3f}{r['peak_gb']:>9.2f}"
            f"{r.get('answers_per_s', float('nan')):>11.1f}"
        )
    targets = []
    if not args.tiny:  # the targets are for the thesis shapes on an H100/H200

        def ratio(a: str, b: str) -> float | None:
            return by[a]["ms_per_step"] / by[b]["ms_per_step"] if a in by and b in by else None

        checks = [
            ("sft MFU >= 0.35", by.get("sft", {}).get("mfu"), lambda v: v >= 0.35),
            ("kd1 cached <= 1.05x sft", ratio("kd1_cached", "sft"), lambda v: v <= 1.05),
            ("kd3 cached <= 1.15x sft", ratio("kd3_cached", "sft"), lambda v: v <= 1.15),
            ("kd1 online <= 0.9x trl gkd", ratio("kd1_online", "trl_gkd"), lambda v: v <= 0.9),
            (
                "generation >= 3x 86 answers/s",
                by.get("generation", {}).get("answers_per_s"),
                lambda v: v >= 3 * BASELINE["generation"],
            ),
        ]
        print()
        for text, value, ok in checks:
            status = "n/a" if value is None else f"{value:.3f}  {verdict(ok(value))}"
            print(f"target {text}: {status}")
            targets.append({"target": text, "value": value, "ok": None if value is None else ok(value)})
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine_line(device),
                    "device": device,
                    "tiny": args.tiny,
                    "attn": args.attn,
                    "student_parameters": n_student,
                    "trainable_parameters": n_trainable,
                    "batch": len(items),
                    "real_tokens": tokens,
                    "padded_tokens": padded_tokens,
                    "kd3_pairs": len(pairs),
                    "mfu_formula": f"6 * N_student * real_tokens / step_seconds / {args.peak_tflops:g}e12",
                    "peak_memory": "torch.cuda.max_memory_allocated per row"
                    if torch.device(device).type == "cuda"
                    else "process RSS high-water mark so far",
                    "baseline_h200_before": BASELINE,
                    "rows": rows,
                    "targets": targets,
                },
                indent=1,
            )
        )
        print(f"\nwrote {args.json}")
    return 0  # figures, not a test: the verdicts are in the output


if __name__ == "__main__":
    sys.exit(main())
