"""Block importance (ShortGPT Block Influence) and the keep-list rules, on tiny models built in code."""

from __future__ import annotations

import copy

import pytest
import torch

from kdlab.models import decoder_blocks
from kdlab.pruning import (
    block_importance,
    keep_blocks_by_importance,
    least_important_run,
    prompt_batches,
)
from kdlab.tiny import build_tiny_llama

PROMPTS = [
    "Review: a charming and moving film . Sentiment:",
    "Review: the plot is dull . Sentiment:",
    "Context: Paris is the capital of France.\nQuestion: What is the capital of France?\nAnswer:",
    "Review: great fun with a happy story and fine performances . Sentiment:",
    "Question: Which team won the game? Answer:",
]


def _identity(model, index: int) -> None:
    """Make block `index` an identity on the residual stream: both of its branches write zero."""
    block = decoder_blocks(model)[1][index]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


@pytest.fixture()
def model(tiny_tokenizer):
    return build_tiny_llama(tiny_tokenizer, num_layers=6, seed=1).eval()


@pytest.fixture()
def batches(tiny_tokenizer):
    return prompt_batches(tiny_tokenizer, PROMPTS, batch_size=2)


def test_scores_one_per_block_in_range(model, batches):
    scores = block_importance(model, batches)
    assert len(scores) == 6
    assert all(-1e-6 <= s <= 2.0 + 1e-6 for s in scores)
    assert all(s > 1e-4 for s in scores)  # random blocks all move the residual stream


@pytest.mark.parametrize("index", [2, 5])  # a middle block, and the last (after which the final norm runs)
def test_identity_block_scores_zero_and_is_dropped_first(model, batches, index):
    _identity(model, index)
    scores = block_importance(model, batches)
    assert scores[index] == pytest.approx(0.0, abs=1e-5)
    others = [s for i, s in enumerate(scores) if i != index]
    assert min(others) > 1e-3
    if index not in (0, len(scores) - 1):
        assert least_important_run(scores, 1) == [index]
        assert keep_blocks_by_importance(scores, 5, contiguous=False) == [i for i in range(6) if i != index]
        assert keep_blocks_by_importance(scores, 5, contiguous=True) == [i for i in range(6) if i != index]
    else:  # the first and last blocks are never dropped, even when they do nothing
        assert index not in least_important_run(scores, 1)


def test_matches_output_hidden_states(model, batches):
    """Blocks 0..n-2: the hooked input/output equal hidden_states[i] / [i + 1] (the last entry is normed)."""
    scores = block_importance(model, batches)
    sums = torch.zeros(6, dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            out = model(**batch, output_hidden_states=True, use_cache=False)
            hs = out.hidden_states
            assert len(hs) == 7
            mask = batch["attention_mask"].bool()
            tokens += int(mask.sum())
            for i in range(6):
                cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)
                sums[i] += cos[mask].double().sum()
    from_hidden_states = [1.0 - float(s) / tokens for s in sums]
    assert scores[:5] == pytest.approx(from_hidden_states[:5], abs=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_ignored(model, tiny_tokenizer, side):
    """Prompts one by one, or batched so the shorter one is padded (either side), give the same scores."""
    prompts = [PROMPTS[1], PROMPTS[0]]
    alone = block_importance(model, prompt_batches(tiny_tokenizer, prompts, batch_size=1))
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.padding_side = side
    batches = prompt_batches(tokenizer, prompts, batch_size=2)
    assert not batches[0]["attention_mask"].all()  # there is padding
    padded = block_importance(model, batches)
    assert alone == pytest.approx(padded, abs=1e-4)


def test_restores_training_mode(model, batches):
    model.train()
    block_importance(model, batches)
    assert model.training
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in decoder_blocks(model)[1])


# ---------------------------------------------------------------------------------------------------------
# keep-list rules on hand-made scores


def test_least_important_run_lowest_sum_inside_the_ends():
    scores = [0.0, 0.5, 0.1, 0.1, 0.9, 0.05, 0.0]
    assert least_important_run(scores, 1) == [5]  # not 0 or 6, though they score lowest
    assert least_important_run(scores, 2) == [2, 3]  # 0.2 beats 4-5 (0.95) and 5-6 (not allowed)
    assert least_important_run(scores, 3) == [1, 2, 3]  # 0.7 vs 2-4 1.1, 3-5 1.05
    assert least_important_run(scores, 5) == [1, 2, 3, 4, 5]
    assert least_important_run(scores, 0) == []
    with pytest.raises(ValueError):
        least_important_run(scores, 6)
    with pytest.raises(ValueError):
        least_important_run(scores, -1)


def test_least_important_run_ties_go_to_the_earliest():
    assert least_important_run([1.0, 0.2, 0.2, 0.2, 0.2, 1.0], 2) == [1, 2]


def test_keep_blocks_contiguous_and_individual():
    scores = [0.9, 0.2, 0.8, 0.1, 0.15, 0.3, 0.05, 0.0]
    # individually lowest inner blocks: 6 (0.05), 3 (0.1), 4 (0.15); block 7 (0.0) is the last: kept
    assert keep_blocks_by_importance(scores, 5, contiguous=False) == [0, 1, 2, 5, 7]
    # lowest run of 3 inside 1..6: 3-5 (0.55) vs 4-6 (0.5) -> 4-6
    assert keep_blocks_by_importance(scores, 5, contiguous=True) == [0, 1, 2, 3, 7]
    assert keep_blocks_by_importance(scores, 8) == list(range(8))
    assert keep_blocks_by_importance(scores, 2, contiguous=False) == [0, 7]
    assert keep_blocks_by_importance(scores, 2, contiguous=True) == [0, 7]


def test_keep_blocks_individual_ties_drop_the_earlier():
    assert keep_blocks_by_importance([1.0, 0.1, 0.1, 0.1, 1.0], 4, contiguous=False) == [0, 2, 3, 4]


@pytest.mark.parametrize("keep", [0, 1, 9])
def test_keep_blocks_rejects_impossible_counts(keep):
    with pytest.raises(ValueError):
        keep_blocks_by_importance([0.5] * 8, keep)
