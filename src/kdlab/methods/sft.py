"""SFT: fine-tuning on the gold answers alone, the baseline every KD method is compared with."""

from __future__ import annotations

from kdlab.methods.base import LossInputs, LossParts, Method, MethodSettings, register, task_ce


class SFTSettings(MethodSettings):
    pass


@register
class SFT(Method):
    name = "sft"
    across_tokenizers = True  # no teacher signal
    settings = SFTSettings
    baseline = True
    color = "#404040"

    def loss(self, x: LossInputs) -> LossParts:
        ce = task_ce(x)
        return ce, {"ce": ce}
