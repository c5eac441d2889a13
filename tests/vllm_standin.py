"""A stand-in for the `vllm` package (not installed here) that holds kdlab to vLLM's documented API.

Its `LLM`, `LLM.generate` and `SamplingParams` take exactly the keyword arguments vLLM documents (names from
the API reference of vllm.entrypoints.llm.LLM and vllm.SamplingParams, v0.8-v0.10), so a misspelt or
removed argument fails here as it would on a GPU machine. Like vLLM >= 0.9, an engine refuses to start when
`gpu_memory_utilization` of the GPU is more than the memory free (the free memory is what
`torch.cuda.mem_get_info` says, which tests may replace).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

import torch

# vllm.LLM's named parameters (the rest of EngineArgs also passes through **kwargs in vLLM; kdlab uses none).
LLM_PARAMETERS = {
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
    "allowed_local_media_path", "tensor_parallel_size", "dtype", "quantization", "revision",
    "tokenizer_revision", "seed", "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "enforce_eager",
    "max_seq_len_to_capture", "disable_custom_all_reduce", "disable_async_output_proc", "hf_token",
    "hf_overrides", "mm_processor_kwargs", "task", "override_pooler_config", "compilation_config",
}
GENERATE_PARAMETERS = {"prompts", "sampling_params", "use_tqdm", "lora_request", "priority"}
SAMPLING_PARAMETERS = {
    "n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
    "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
    "logits_processors", "include_stop_str_in_output", "truncate_prompt_tokens", "output_kind",
    "guided_decoding", "logit_bias", "allowed_token_ids", "extra_args", "bad_words",
}


def _check(what: str, given: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword argument(s) {unknown} (not in vLLM's API)")


class VLLMStandIn:
    """`module` goes into sys.modules["vllm"]. `engines` records each engine's arguments, `calls` each
    generate call; `answer(prompt_token_ids)` makes each continuation, `on_start()` runs as an engine
    starts (tests check what is on the GPU then)."""

    def __init__(self, answer: Callable[[list[int]], str] | None = None,
                 on_start: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.engines: list[dict[str, Any]] = []
        self.calls: list[tuple[list[dict[str, Any]], Any]] = []
        answer = answer or (lambda ids: " the answer\n")
        outer = self

        class SamplingParams:
            def __init__(self, **kwargs: Any) -> None:
                _check("SamplingParams", kwargs, SAMPLING_PARAMETERS)
                self.kwargs = kwargs

        class LLM:
            def __init__(self, model: str, **kwargs: Any) -> None:
                _check("LLM", {"model": model, **kwargs}, LLM_PARAMETERS)
                fraction = kwargs.get("gpu_memory_utilization", 0.9)
                if not 0 < fraction <= 1:
                    raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {fraction}")
                if torch.cuda.is_available():
                    free, total = torch.cuda.mem_get_info()
                    if fraction * total > free:  # vLLM >= 0.9's start-up check
                        raise ValueError(f"Free memory on device ({free / 2**30:.2f}/{total / 2**30:.2f} "
                                         f"GiB) is less than desired GPU memory utilization ({fraction})")
                engine = {"model": model, **kwargs}
                outer.engines.append(engine)
                if on_start is not None:
                    on_start(engine)

            def generate(self, *args: Any, **kwargs: Any) -> list[Any]:
                bound = inspect.signature(_generate).bind(*args, **kwargs)
                _check("LLM.generate", bound.arguments, GENERATE_PARAMETERS)
                prompts = bound.arguments["prompts"]
                params = bound.arguments.get("sampling_params")
                if params is not None and not isinstance(params, SamplingParams | list):
                    raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
                outer.calls.append((prompts, params))
                texts = [answer(p["prompt_token_ids"]) for p in prompts]
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text)]) for text in texts]

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams  # type: ignore[attr-defined]


def _generate(prompts: Any, sampling_params: Any = None, use_tqdm: bool = True, lora_request: Any = None,
              priority: Any = None) -> None:
    """vllm.LLM.generate's documented signature (the stand-in binds calls to it)."""
