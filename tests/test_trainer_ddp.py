"""UnlearnTrainer under `accelerate launch` with 2 CPU processes (DDP over gloo)."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")


def test_two_process_ddp_same_mask_same_weights(tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate CLI not found")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_unlearn_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with socket.socket() as sock:  # a free localhost port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # `--multi_gpu` is accelerate's torchrun launcher; with TrainingArguments(use_cpu=True,
    # ddp_backend="gloo") the processes form a CPU DDP group (accelerate's --cpu flag would start one).
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
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
