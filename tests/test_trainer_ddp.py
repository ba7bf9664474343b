"""UnlearnTrainer as a 2-process CPU DDP job (gloo), launched by torchrun.

The launcher is ``torch.distributed.run --standalone`` (what ``accelerate launch --multi_gpu`` calls
underneath): its c10d rendezvous binds port 0 in the agent and hands the bound store to the workers,
so there is no pick-a-free-port-then-release race between parallel test runs. ``accelerate launch``
with a fixed or ``0`` ``--main_process_port`` picks a port and releases it before torchrun binds it.
The Trainer inside the workers goes through accelerate exactly as under ``accelerate launch``.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")


def test_two_process_ddp_same_mask_same_weights(tmp_path):
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_unlearn_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           worker, str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    assert a["world"] == b["world"] == 2
    assert a["digest"] == b["digest"]  # identical masks on every rank
    assert a["frozen_ok"] and b["frozen_ok"]  # frozen weights bit-identical on both
    assert a["moved"] > 0
    for n in a["weights"]:
        assert torch.equal(a["weights"][n], b["weights"][n]), n  # DDP kept replicas in sync
    # compact gradients under DDP: the comm hook ran, replicas in sync, frozen weights untouched, and
    # the same weights as dense (fp32 rounding: compact mode backpropagates forget and retain terms
    # separately, each reduced on its own)
    assert a["hooked"] and b["hooked"]
    assert a["compact_frozen_ok"] and b["compact_frozen_ok"]
    for n in a["compact"]:
        assert torch.equal(a["compact"][n], b["compact"][n]), n
        torch.testing.assert_close(a["compact"][n], a["weights"][n], atol=1e-6, rtol=1e-5)
