"""DDP and FSDP2 (two CPU processes, gloo) against one process at the same global batch.

test_fsdp.py compares DDP and FSDP with each other, which a wrong loss scale under several processes (the
`× num_processes` in `KDTrainer.compute_loss`) would pass. Here one launch of two ranks trains the same
KD2 step (gold, teacher-answer and transfer rows: all three global token counts) with DDP, then with FSDP2,
and each must log the first-step loss, its parts and the gradient norm of one process at the same global
batch (8 examples: 2 per rank × 2 accumulation steps, against 4 × 2 in one process). The same launch asks
for FSDP while accelerate's CPU switch is off, and the run must fail rather than train with DDP.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_catches_losses import PAD, VOCAB, Data, _first_log, _llama, _settings

from kdlab.methods import METHODS
from kdlab.training import train

TESTS = Path(__file__).resolve().parent

SCRIPT = r'''
import contextlib, copy, json, sys
sys.path.insert(0, sys.argv[2])
import torch
import torch.distributed as dist
import kdlab.training
from kdlab.methods import METHODS
from kdlab.training import train
from test_catches_losses import PAD, VOCAB, Data, _first_log, _llama, _settings

out = {}
student = _llama(2, seed=1)
data = Data()
modes = {
    "ddp": {},
    "fsdp": {"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2}},
}
for mode, extra in modes.items():
    result = train(
        copy.deepcopy(student), data.items, method=METHODS["kd2"], params={"lam": 0.5},
        settings=_settings(batch_size=2, **extra), output_dir=f"{sys.argv[1]}/{mode}", seed=5, pad_id=PAD,
        vocab_size=VOCAB,
    )
    out[mode] = {"log": _first_log(result), "world": dist.get_world_size()}

# FSDP asked for, accelerate left to choose on a CPU (it picks DDP): the run must refuse to go on.
kdlab.training.fsdp_on_cpu = contextlib.nullcontext
try:
    train(copy.deepcopy(student), data.items, method=METHODS["kd2"], params={"lam": 0.5},
          settings=_settings(batch_size=2, **modes["fsdp"]), output_dir=f"{sys.argv[1]}/refused", seed=5,
          pad_id=PAD, vocab_size=VOCAB)
    out["refused"] = None
except ValueError as e:
    out["refused"] = str(e)
if dist.get_rank() == 0:
    with open(f"{sys.argv[1]}/result.json", "w") as fh:
        json.dump(out, fh)
'''


def test_ddp_and_fsdp_log_the_loss_and_grad_norm_of_one_process(tmp_path: Path) -> None:
    script = tmp_path / "two_ranks.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path), str(TESTS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((tmp_path / "result.json").read_text())

    one = _first_log(train(
        copy.deepcopy(_llama(2, seed=1)), Data().items, method=METHODS["kd2"], params={"lam": 0.5},
        settings=_settings(batch_size=4), output_dir=tmp_path / "one", seed=5, pad_id=PAD, vocab_size=VOCAB,
    ))
    assert set(one) == {"loss", "loss_ce", "loss_kd", "grad_norm"}
    for mode in ("ddp", "fsdp"):
        assert got[mode]["world"] == 2
        log = got[mode]["log"]
        for key, value in one.items():
            assert log[key] == pytest.approx(value, rel=1e-3, abs=2e-4), (mode, key, log, one)
    assert got["refused"] is not None and "FSDP was asked for" in got["refused"]
