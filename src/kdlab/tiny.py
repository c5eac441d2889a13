"""Tiny models built in code (a few layers, a small BPE vocabulary) for the smoke preset and unit tests.

They are saved like any Hugging Face checkpoint, so every other code path loads them with `from_pretrained`
exactly as it loads a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Enough English and the prompt/label words of both tasks that BPE gives them their own tokens.
_CORPUS = """
Review: this movie is a charming and often affecting journey . Sentiment: positive
Review: the plot is dull , the acting is worse and the jokes fall flat . Sentiment: negative
Review: a great film with a moving story and fine performances . Sentiment: positive
Review: it 's a bad , boring and terrible mess . Sentiment: negative
Context: The Denver Broncos won the game in the city of Santa Clara in February.
Question: Which team won the game? Answer: Denver Broncos
Context: Paris is the capital of France and its largest city on the river Seine.
Question: What is the capital of France? Answer: Paris
the a an of to in and is was for on with as by at from that which who what when where why how
one two three four five six seven eight nine ten hundred thousand year years first last new old
positive negative good bad great terrible best worst love hate fun funny sad happy story film movie
""" * 4


def build_tiny_tokenizer(
    vocab_size: int = 512, *, add_bos: bool = False, add_eos: bool = False
) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer (special tokens <pad> <s> </s> <unk>).

    ``add_bos`` / ``add_eos``: whether encoding with special tokens puts <s> first / </s> last, to mimic
    Llama-style and eos-appending tokenizers. The default adds neither (what the tiny-llama alias saves).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    if add_bos or add_eos:
        single = " ".join([*(["<s>"] if add_bos else []), "$A", *(["</s>"] if add_eos else [])])
        tok.post_processor = processors.TemplateProcessing(
            single=single,
            special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerFast,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    seed: int = 0,
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def write_tiny_llama(folder: Path, *, num_layers: int = 4, hidden_size: int = 64) -> Path:
    """Build and save a tiny Llama + tokenizer into `folder` (deterministic: same bytes every time)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer, num_layers=num_layers, hidden_size=hidden_size)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
