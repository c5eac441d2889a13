"""kdlab: knowledge-distillation studies on causal language models."""

__version__ = "0.1.0"
