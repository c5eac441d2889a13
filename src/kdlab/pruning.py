"""Which teacher blocks a derived student keeps: block importance and the keep-list rules.

`block_importance` is the "Block Influence" score of ShortGPT (Men et al., 2024): for decoder block i,
BI_i = 1 - mean cos(x_i, y_i) over the real (non-padding) tokens of some prompts, where x_i is the block's
input hidden state and y_i its output. A block that barely changes the residual stream (cos ≈ 1) scores ≈ 0
and is the first candidate to drop.

The block inputs and outputs are taken with forward hooks on the decoder blocks themselves, not from
`output_hidden_states`: in Llama-style models the last entry of `hidden_states` is the final norm's output,
not the last block's, so the last block's score would measure the norm too. Every other input/output pair is
the same as `hidden_states[i]` / `hidden_states[i + 1]` (the tests check this).

`least_important_run` and `keep_blocks_by_importance` turn a score list into 0-based block indices; they are
pure functions, so a keep-list can be chosen once and written into a study config as `derive: {layers: …}`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from kdlab.models import decoder_blocks

__all__ = [
    "block_importance",
    "keep_blocks_by_importance",
    "least_important_run",
    "prompt_batches",
]


def _tensor(output: object) -> torch.Tensor:
    """A block's hidden states, whether the block returns a tensor or a tuple (older transformers)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot read hidden states from a block output of type {type(output).__name__}")


@torch.no_grad()
def block_importance(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> list[float]:
    """ShortGPT Block Influence of every decoder block: 1 - mean cosine(block input, block output).

    `batches` yields dicts with `input_ids` and `attention_mask` (left or right padding: position ids are
    derived from the mask, padding tokens are left out of the mean, and each real token weighs the same).
    The mean is taken over all real tokens of all batches. The model is run in eval mode, with
    `use_cache=False`; its training flag is restored afterwards.
    """
    _, blocks = decoder_blocks(model)
    n = len(blocks)
    inputs: list[torch.Tensor | None] = [None] * n
    sums = torch.zeros(n, dtype=torch.float64)
    mask_holder: dict[str, torch.Tensor] = {}

    def pre_hook(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[index] = hidden.detach()

        return hook

    def post_hook(index: int):
        def hook(_module: nn.Module, _args: tuple, _kwargs: dict, output: object) -> None:
            x = inputs[index]
            y = _tensor(output).detach()
            cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (batch, seq)
            real = mask_holder["mask"]
            sums[index] += cos[real].double().sum()
            inputs[index] = None

        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = 0
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            attention_mask = attention_mask.to(device)
            mask_holder["mask"] = attention_mask.bool()
            tokens += int(attention_mask.sum())
            # Positions from the mask, so left- and right-padded prompts give the same scores.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("block_importance needs at least one real token")
    return [1.0 - float(s) / tokens for s in sums]


def prompt_batches(
    tokenizer, prompts: Sequence[str], *, batch_size: int = 8, max_length: int = 256
) -> list[dict[str, torch.Tensor]]:
    """Tokenized, padded batches of `prompts` for `block_importance` (truncated to `max_length`)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs a pad token (kdlab.models.load_tokenizer sets one)")
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(
            list(prompts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def least_important_run(scores: Sequence[float], drop: int) -> list[int]:
    """The `drop` consecutive blocks with the lowest summed score, never the first or the last block.

    Returns the 0-based indices of the blocks to DROP, ascending. Ties go to the earliest run.
    """
    n = len(scores)
    if drop < 0:
        raise ValueError(f"drop must be >= 0, got {drop}")
    if drop == 0:
        return []
    if drop > n - 2:
        raise ValueError(f"can drop at most {n - 2} of {n} blocks (the first and the last are kept)")
    best_start, best_sum = 1, None
    for start in range(1, n - drop):  # the run start..start+drop-1 stays inside 1..n-2
        total = sum(scores[start : start + drop])
        if best_sum is None or total < best_sum:
            best_start, best_sum = start, total
    return list(range(best_start, best_start + drop))


def keep_blocks_by_importance(
    scores: Sequence[float], keep: int, *, contiguous: bool = True
) -> list[int]:
    """The 0-based blocks to KEEP (ascending), `keep` of `len(scores)`; the first and last are always kept.

    contiguous=True drops one run of consecutive blocks (`least_important_run`); contiguous=False drops the
    individually lowest-scoring blocks (ties: the earlier block is dropped first).
    """
    n = len(scores)
    if not 0 < keep <= n:
        raise ValueError(f"keep must be in 1..{n}, got {keep}")
    if keep < min(2, n):
        raise ValueError("keep must be >= 2: the first and the last block are always kept")
    drop = n - keep
    if contiguous:
        dropped = set(least_important_run(scores, drop))
    else:
        inner = sorted(range(1, n - 1), key=lambda i: (scores[i], i))
        dropped = set(inner[:drop])
    return [i for i in range(n) if i not in dropped]
