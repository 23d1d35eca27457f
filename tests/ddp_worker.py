"""Worker for tests/test_ddp.py: a tiny fit under torchrun (gloo, CPU). Writes rank<r>.json into argv[2] per rank."""

import json
import os
import sys

import torch
import torch.distributed as dist

from mlic_lib.data import TensorImageDataset, make_scenes
from mlic_lib.engine import TrainConfig, fit
from mlic_lib.models import build_model
from mlic_lib.utils import seed_everything

torch.set_num_threads(1)
train, test = make_scenes(64, seed=1), make_scenes(32, seed=2, split="test")
seed_everything(0)
model = build_model("small_resnet", 20, widths=(8, 8, 16, 16))
res = fit(model, TensorImageDataset(train.images, train.targets), TensorImageDataset(test.images, test.targets),
          TrainConfig(epochs=2, batch_size=16, seed=0), run_dir=sys.argv[1], progress=False)
flat = torch.cat([p.detach().flatten() for p in res.model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
# one file per rank: the ranks share the launcher's stdout, where their lines can interleave
report = {"rank": dist.get_rank(), "same": all(torch.equal(gathered[0], g) for g in gathered),
          "epochs": len(res.history), "world": int(os.environ["WORLD_SIZE"])}
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as fh:
    json.dump(report, fh)
dist.destroy_process_group()
