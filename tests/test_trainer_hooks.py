"""The transformers Trainer internals KDTrainer relies on. kdlab overrides two private methods for which no
public hook exists (`KDTrainer.PRIVATE_OVERRIDES`); pyproject.toml pins the tested transformers range, and
this test fails on an upgrade that renames them, changes their signatures or stops calling them where kdlab
expects, instead of letting checkpoints or the non-finite-gradient check break silently."""

from __future__ import annotations

import inspect

import pytest
import transformers
from packaging.version import Version
from transformers import Trainer

from kdlab.training import KDTrainer

# name -> the parameters kdlab's override takes, and the call the training loop makes
EXPECTED = {
    "_get_grad_norm": (["self", "model", "grad_norm"], "self._get_grad_norm(model, grad_norm=grad_norm)"),
    "_load_from_checkpoint": (["self", "resume_from_checkpoint", "model"],
                              "self._load_from_checkpoint(resume_from_checkpoint"),
}
# Public methods KDTrainer overrides whose calls it depends on.
PUBLIC = {
    "save_model": "self.save_model(output_dir, _internal_call=True)",
    "get_batch_samples": "self.get_batch_samples(epoch_iterator, num_batches, self.args.device)",
}


def test_private_overrides_are_the_listed_ones() -> None:
    overridden = {name for name in vars(KDTrainer) if name.startswith("_") and not name.startswith("__")
                  and callable(getattr(Trainer, name, None))}
    assert overridden == set(KDTrainer.PRIVATE_OVERRIDES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_private_trainer_methods_keep_their_signature_and_call(name: str) -> None:
    params, call = EXPECTED[name]
    assert list(inspect.signature(getattr(Trainer, name)).parameters) == params, (
        f"transformers {transformers.__version__} changed Trainer.{name}: update KDTrainer and the pin")
    assert call in inspect.getsource(Trainer), f"Trainer no longer calls {call}"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_hooks_are_called_where_kdlab_expects(name: str) -> None:
    assert PUBLIC[name] in inspect.getsource(Trainer)


def test_installed_transformers_is_in_the_pinned_range() -> None:
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    pin = next(Requirement(r) for r in requires("kdlab") if Requirement(r).name == "transformers")
    assert pin.specifier.contains(Version(transformers.__version__)), (transformers.__version__, str(pin))
    assert any(s.operator == "<" for s in pin.specifier)  # an upper bound: untested releases are not taken
