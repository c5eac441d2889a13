"""Tiny models built in code (a few layers, a small BPE vocabulary) for the smoke preset and unit tests.

They are saved like any Hugging Face checkpoint, so every other code path loads them with `from_pretrained`
exactly as it loads a real model. Besides Llama, `build_tiny_model` makes tiny models of other decoder
families (`TINY_FAMILIES`), each with the block layout and per-layer config of its family (GPT-2's
`transformer.h` and fused `c_attn`, GPT-NeoX's `query_key_value` and parallel residual, Qwen2's and Gemma3's
sliding-window layers), all sharing the tiny tokenizer so that any two of them can be teacher and student.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

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
    vocab_size: int = 512, *, add_bos: bool = False, add_eos: bool = False, corpus: str | None = None
) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer (special tokens <pad> <s> </s> <unk>).

    ``add_bos`` / ``add_eos``: whether encoding with special tokens puts <s> first / </s> last, to mimic
    Llama-style and eos-appending tokenizers. The default adds neither (what the tiny-llama alias saves).
    ``corpus``: the text it is trained on (default: the built-in one). Two tokenizers trained on different
    corpora cut the same text differently both ways (teacher and student of different tokenizers).
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
    tok.train_from_iterator((_CORPUS if corpus is None else corpus).splitlines(), trainer=trainer)
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


# -- other families ------------------------------------------------------------------------------------------


def _ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


ConfigMaker = Callable[[PreTrainedTokenizerFast, int, int], PretrainedConfig]


def _llama_like(cls_name: str, **extra: Any) -> ConfigMaker:
    def make(tokenizer: PreTrainedTokenizerFast, layers: int, width: int) -> PretrainedConfig:
        import transformers

        return getattr(transformers, cls_name)(
            hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, **_ids(tokenizer),
            **extra,
        )

    return make


def _phi3(tokenizer: PreTrainedTokenizerFast, layers: int, width: int) -> PretrainedConfig:
    from transformers import Phi3Config

    # Fused qkv_proj and gate_up_proj: a family peft has no default LoRA targets for.
    return Phi3Config(
        hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, original_max_position_embeddings=1024,
        **_ids(tokenizer),
    )


def _gpt2(tokenizer: PreTrainedTokenizerFast, layers: int, width: int) -> PretrainedConfig:
    from transformers import GPT2Config

    return GPT2Config(n_embd=width, n_layer=layers, n_head=4, n_positions=1024, **_ids(tokenizer))


def _gpt_neox(tokenizer: PreTrainedTokenizerFast, layers: int, width: int) -> PretrainedConfig:
    from transformers import GPTNeoXConfig

    # Untied head, partial rotary and parallel residual: what Pythia checkpoints use.
    return GPTNeoXConfig(
        hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=1024, rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False,
        **_ids(tokenizer),
    )


def _phi(tokenizer: PreTrainedTokenizerFast, layers: int, width: int) -> PretrainedConfig:
    from transformers import PhiConfig

    return PhiConfig(
        hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=1024, partial_rotary_factor=0.5, **_ids(tokenizer),
    )


def _gemma3(tokenizer: PreTrainedTokenizerFast, layers: int, width: int) -> PretrainedConfig:
    from transformers import Gemma3TextConfig

    # Every other layer sliding (window 8), so a derived student keeps a mix of both kinds.
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return Gemma3TextConfig(
        hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=width // 4, max_position_embeddings=1024, sliding_window=8,
        layer_types=types, **_ids(tokenizer),
    )


def _opt(tokenizer: PreTrainedTokenizerFast, layers: int, width: int) -> PretrainedConfig:
    from transformers import OPTConfig

    return OPTConfig(
        hidden_size=width, ffn_dim=width * 2, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=1024, word_embed_proj_dim=width, **_ids(tokenizer),
    )


TINY_FAMILIES: dict[str, ConfigMaker] = {
    "llama": _llama_like("LlamaConfig"),
    "mistral": _llama_like("MistralConfig", sliding_window=None),
    # Qwen2 with its sliding window on the upper half of the layers (max_window_layers), as Qwen2 configs
    # describe it.
    "qwen2": _llama_like("Qwen2Config", use_sliding_window=True, sliding_window=8, max_window_layers=2),
    "qwen3": _llama_like("Qwen3Config", head_dim=16),
    "gemma3_text": _gemma3,
    "phi": _phi,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "opt": _opt,
}


def build_tiny_model(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    seed: int = 0,
) -> PreTrainedModel:
    """A tiny randomly initialised causal LM of `family` (a key of `TINY_FAMILIES`: the model type)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {sorted(TINY_FAMILIES)}")
    config = TINY_FAMILIES[family](tokenizer, num_layers, hidden_size)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def write_tiny_model(
    folder: Path, family: str, *, num_layers: int = 4, hidden_size: int = 64, seed: int = 0
) -> Path:
    """Build and save a tiny model of `family` + the tiny tokenizer into `folder` (deterministic)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(family, tokenizer, num_layers=num_layers, hidden_size=hidden_size, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
