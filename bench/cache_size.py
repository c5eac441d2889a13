"""Size of a KD1 teacher cache: bytes per answer token at k=32 for the SmolLM2 vocabulary (49152 tokens).
Target: `TeacherCache.bytes_per_token()` <= 128.

The figure counts everything KD1 reads: top-k indices and fp16 log-probs, plus one fp32 tail (the log-sum-exp
of the tempered non-top-k log-probs, which makes the loss exact) per KD1 temperature. The parts are printed
separately.

    python bench/cache_size.py              # synthetic top-k rows written with TeacherCacheWriter
    python bench/cache_size.py --teacher    # real SmolLM2 forward passes through build_teacher_cache
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import encode_sst2, machine_line, sst2_like_examples, verdict

from kdlab.models import SMOLLM2_ALIAS, folder_size_bytes, load_model, load_tokenizer, resolve_model_path
from kdlab.stages.cache import build_teacher_cache
from kdlab.teacher_cache import TeacherCache, TeacherCacheWriter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", action="store_true",
                   help="cache real SmolLM2 outputs for SST-2-like examples instead of synthetic rows")
    p.add_argument("--examples", type=int, help="examples cached (default 2000 synthetic, 32 with --teacher)")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the SmolLM2 tokenizer's)")
    p.add_argument("--max-answer-tokens", type=int, default=24, help="synthetic answers: 1..N tokens")
    p.add_argument("--temperatures", type=float, nargs="*", default=[2.0],
                   help="KD1 temperatures whose tails the cache stores (default: 2, the presets' grid)")
    p.add_argument("--target", type=float, default=128.0, help="largest bytes per token that passes")
    return p.parse_args(argv)


def synthetic_cache(directory: Path, *, examples: int, vocab: int, k: int, max_tokens: int,
                    temperatures: list[float]) -> TeacherCache:
    """Plausible top-k rows: distinct indices spread over the vocabulary, sorted log-probabilities, and the
    tail of each temperature as if the leftover mass were spread evenly over the other tokens."""
    rng = np.random.default_rng(0)
    with TeacherCacheWriter(directory, fingerprint_inputs={"bench": "cache_size"}, vocab_size=vocab,
                            top_k=k, temperatures=temperatures) as writer:
        for i in range(examples):
            n = int(rng.integers(1, max_tokens + 1))
            idx = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
            logits = np.sort(rng.normal(scale=3.0, size=(n, k)), axis=-1)[:, ::-1]
            # Log-probs of the k listed tokens with some mass left over for the tail.
            lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True)) - 0.05
            rest = vocab - k
            log_each = np.log(-np.expm1(-0.05)) - np.log(rest)  # log-prob of one tail token
            tails = {t: np.full(n, np.log(rest) + log_each / t, dtype=np.float32) for t in temperatures}
            writer.add(f"ex-{i}", topk_indices=idx, topk_logprobs=lp, topk_tail=tails)
    return TeacherCache.open(directory)


def teacher_cache(directory: Path, *, examples: int, k: int, temperatures: list[float]) -> TeacherCache:
    path = resolve_model_path(SMOLLM2_ALIAS)
    tokenizer = load_tokenizer(path)
    teacher = load_model(path)
    items = sst2_like_examples(examples)
    task, encoded = encode_sst2(items, tokenizer)
    return build_teacher_cache(directory, task=task, teacher=teacher, tokenizer=tokenizer, examples=items,
                               encoded=encoded, fingerprint_inputs={"bench": "cache_size"}, top_k=k,
                               hidden_layers=[], answers=False, batch_size=8, temperatures=temperatures)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vocab = args.vocab or len(load_tokenizer(resolve_model_path(SMOLLM2_ALIAS)))
    with tempfile.TemporaryDirectory(prefix="cache_size-") as tmp:
        directory = Path(tmp) / "cache"
        start = time.perf_counter()
        if args.teacher:
            n = args.examples or 32
            cache = teacher_cache(directory, examples=n, k=args.top_k, temperatures=args.temperatures)
            source = f"SmolLM2-135M-Instruct forward passes over {n} SST-2-like examples"
        else:
            n = args.examples or 2000
            cache = synthetic_cache(directory, examples=n, vocab=vocab, k=args.top_k,
                                    max_tokens=args.max_answer_tokens, temperatures=args.temperatures)
            source = f"{n} synthetic examples of 1-{args.max_answer_tokens} answer tokens"
        seconds = time.perf_counter() - start
        per_token = cache.bytes_per_token()
        parts = cache.bytes_per_token_parts()
        on_disk = folder_size_bytes(directory) / cache.num_tokens
        manifest = cache.manifest

    print("\ncache_size: KD1 teacher cache, bytes per answer token")
    print(machine_line("cpu"))
    print(f"source: {source}; built in {seconds:.1f}s")
    print(f"vocab {manifest['vocab_size']} -> indices {manifest['index_dtype']}, log-probs "
          f"{manifest['logprob_dtype']}, k={manifest['top_k']}, tails {manifest['tail_dtype']} for T in "
          f"{list(manifest['temperatures'])}; {cache.num_tokens} answer tokens, {len(cache)} examples")
    print(f"bytes per token, top-k indices + log-probs: {parts['topk']:.2f}")
    for name, value in parts.items():
        if name != "topk":
            print(f"bytes per token, {name} (exact tail at T={name[len('tail-T'):]}): {value:.2f}")
    print(f"bytes per token, total (TeacherCache.bytes_per_token): {per_token:.2f}")
    print(f"bytes per token on disk (whole folder: npy headers, index, manifest): {on_disk:.2f}")
    ok = per_token <= args.target
    print(f"\ntarget bytes per token <= {args.target:g}: {per_token:.2f}  {verdict(ok)}")
    return 0  # a figure, not a test: the verdict is in the output


if __name__ == "__main__":
    sys.exit(main())
