"""Worker for tests/test_ddp.py: a tiny fit under torchrun (gloo, CPU). Writes rank<r>.json into argv[2] per rank.

argv[3] picks the training: ``plain`` (BCE on a Dataset, DistributedSampler, validation split between the
ranks, and a set of one image, which leaves rank 0 nothing to score), ``ltml`` (LTML's two-stream loader and the
branch-ensemble step, whose compensation parameters get no gradient), ``seeds`` (the random draws of an
augmentation on each rank, uninterrupted and interrupted after epoch 0 then resumed, with an EMA of the weights),
``nan`` (a loss that is NaN on rank 1 only) or ``splicemix`` (SpliceMix-CL's step, which needs the feature map as
well as the logits, through the DDP wrapper) or ``keys`` (a step that logs a key on one rank only).
"""

import faulthandler
import json
import os
import sys

import torch
import torch.distributed as dist

from mlic_lib.data import TensorImageDataset, make_scenes
from mlic_lib.engine import TrainConfig, default_predict, evaluate, fit, predict_sharded
from mlic_lib.metrics import multilabel_report
from mlic_lib.models import build_model
from mlic_lib.utils import seed_everything

# torchrun starts its workers in sessions of their own, out of reach of the test's kill on a timeout: a hung worker
# prints where every thread is and exits by itself, before the test's 240 s
faulthandler.dump_traceback_later(200, exit=True)
torch.set_num_threads(1)
mode = sys.argv[3] if len(sys.argv) > 3 else "plain"
train, test = make_scenes(64, seed=1), make_scenes(32, seed=2, split="test")
train_ds = TensorImageDataset(train.images, train.targets)
seed_everything(0)
report = {}
if mode == "ltml":
    from mlic_lib import ltml
    from mlic_lib.data.samplers import TwoStreamLoader
    from mlic_lib.models.ltml import build_two_branch

    model = build_two_branch("small_resnet", 20, widths=(8, 8, 16, 16))
    loader = TwoStreamLoader(train_ds, train.targets, 8, seed=0)
    report["uniform_epoch0"] = loader.epoch_indices(0)[0].tolist()
    report["steps"] = len(loader)
    step = ltml.LTMLStep(**ltml.VARIANTS["ensemble"])
    res = fit(model, loader, None, TrainConfig(epochs=2, batch_size=8, seed=0), step=step, run_dir=sys.argv[1],
              progress=False, steps_per_epoch=len(loader))
    # the paper's single-branch baseline (Eq. 4): the other branch and both compensations get no gradient
    cfg1 = TrainConfig(epochs=1, batch_size=8, seed=0)
    base = fit(build_two_branch("small_resnet", 20, widths=(8, 8, 16, 16)), loader, None, cfg1,
               step=ltml.LTMLStep(**ltml.VARIANTS["baseline_u"]), run_dir=sys.argv[1] + "-baseline_u", progress=False,
               steps_per_epoch=len(loader))
    report["baseline_u_epochs"] = len(base.history)
    # the paper's method (Eq. 3 with Eq. 6's compensation in both branches, one set shared by both in the option):
    # every parameter gets a gradient, so DDP runs without find_unused_parameters
    for name in ("full", "full_shared"):
        net = build_two_branch("small_resnet", 20, widths=(8, 8, 16, 16), shared_compensation=name == "full_shared")
        fit(net, loader, None, cfg1, step=ltml.LTMLStep(**ltml.VARIANTS["full"]), run_dir=None, progress=False,
            steps_per_epoch=len(loader))
        flat = torch.cat([t.detach().flatten().double() for t in (*net.parameters(), *net.buffers())])
        both = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(both, flat)
        report[f"{name}_same"] = all(torch.equal(both[0], g) for g in both)
        report[f"{name}_mu_moved"] = float(net.comp_u.mu_pos.detach().abs().max())
    try:  # one branch *with* Eq. 6 cannot run under DDP: a clear error, not DDP's "marked ready twice"
        fit(build_two_branch("small_resnet", 20, widths=(8, 8, 16, 16)), loader, None, cfg1,
            step=ltml.LTMLStep(branches="u", compensation=True), run_dir=None, progress=False,
            steps_per_epoch=len(loader))
        report["single_branch_compensation_error"] = None
    except RuntimeError as err:
        report["single_branch_compensation_error"] = str(err)
elif mode == "nan":  # rank 1's loss is NaN at the first step: both ranks must stop with the same error
    class NanOnRank1:
        def __call__(self, model, batch, device):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch[0]), batch[1])
            return (loss * float("nan") if dist.get_rank() == 1 else loss), {}

    try:
        fit(build_model("small_resnet", 20, widths=(8, 8, 16, 16)), train_ds, None,
            TrainConfig(epochs=1, batch_size=16, seed=0), step=NanOnRank1(), run_dir=None, progress=False)
        report["error"] = None
    except FloatingPointError as err:
        report["error"] = str(err)
    res = None
elif mode == "splicemix":
    from mlic_lib.splicemix_cl import make_step

    res = fit(build_model("small_resnet", 20, widths=(8, 8, 16, 16)), train_ds, None,
              TrainConfig(epochs=2, batch_size=16, seed=0), step=make_step("splicemix_cl"), run_dir=sys.argv[1],
              progress=False)
    report["loss_cl"] = [h.get("loss_cl") for h in res.history]
elif mode == "keys":  # rank 1 logs a key rank 0 never does: the epoch's all-reduce used to pair different keys
    class RankKeys:
        def __call__(self, model, batch, device):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch[0]), batch[1])
            return loss, ({"rank1_only": torch.ones(())} if dist.get_rank() == 1 else {})

    res = fit(build_model("small_resnet", 20, widths=(8, 8, 16, 16)), train_ds, None,
              TrainConfig(epochs=1, batch_size=16, seed=0), step=RankKeys(), run_dir=None, progress=False)
    report["history"] = res.history
elif mode == "seeds":
    draws = []

    def record(x):  # an "augmentation" that only draws from the process's global RNG
        draws.append(float(torch.rand(())))
        return x

    class Stop(Exception):
        pass

    def net():  # the same initial weights for both runs (the first run's draws moved the global RNG on)
        torch.manual_seed(0)
        return build_model("small_resnet", 20, widths=(8, 8, 16, 16))

    def stop_after_first_epoch(epoch, logs):
        if epoch == 0:
            raise Stop

    aug_ds = TensorImageDataset(train.images, train.targets, transform=record)
    cfg = TrainConfig(epochs=2, batch_size=16, seed=0, ema_decay=0.5)  # the EMA's weights are fit's result
    res = fit(net(), aug_ds, None, cfg, run_dir=sys.argv[1], progress=False)
    report["draws"] = list(draws)
    draws.clear()
    try:
        fit(net(), aug_ds, None, cfg, run_dir=sys.argv[1] + "-interrupted", progress=False,
            on_epoch_end=stop_after_first_epoch)
    except Stop:
        pass
    resumed = fit(net(), aug_ds, None, cfg, run_dir=sys.argv[1] + "-interrupted", progress=False)
    report["draws_interrupted_and_resumed"] = list(draws)
    report["resumed_history"] = [h["loss"] for h in resumed.history]
    report["resumed_same_weights"] = all(torch.equal(a, b) for a, b in zip(
        res.model.state_dict().values(), resumed.model.state_dict().values(), strict=True))
else:
    model = build_model("small_resnet", 20, widths=(8, 8, 16, 16))
    val_ds = TensorImageDataset(test.images[:31], test.targets[:31])  # 31: the ranks' shares differ in size
    scored = []

    def counting_predict(m, x):
        scored.append(len(x))
        return default_predict(m, x)

    res = fit(model, train_ds, val_ds, TrainConfig(epochs=2, batch_size=16, seed=0, eval_batch_size=8, eval_every=0),
              run_dir=sys.argv[1], progress=False, predict_fn=counting_predict)
    report["val_images_scored"] = sum(scored)
    report["final_mAP"] = res.final["mAP"]
    sharded = predict_sharded(res.model, val_ds, torch.device("cpu"), 8)  # what validate() gathered
    single = evaluate(res.model, val_ds, torch.device("cpu"), batch_size=8)  # this process alone, whole set
    report["sharded_mAP"] = multilabel_report(sharded[0], sharded[1])["mAP"]
    report["sharded_vs_single_max_diff"] = float(abs(sharded[0] - single.scores).max())
    report["sharded_targets_in_order"] = bool((sharded[1] == single.targets).all())
    one = TensorImageDataset(test.images[:1], test.targets[:1])  # rank 0's share is empty: it scores nothing
    one_sharded = predict_sharded(res.model, one, torch.device("cpu"), 8)
    report["one_image_scores"] = one_sharded[0].tolist()
    alone = evaluate(res.model, one, torch.device("cpu")).scores
    report["one_image_max_diff"] = float(abs(one_sharded[0] - alone).max())
report["rank"] = dist.get_rank()
if res is not None:
    # the parameters and the buffers (BatchNorm statistics: each rank updates its own in the last step)
    flat = torch.cat([t.detach().flatten().double() for t in (*res.model.parameters(), *res.model.buffers())])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    report.update({"same": all(torch.equal(gathered[0], g) for g in gathered), "epochs": len(res.history),
                   "world": int(os.environ["WORLD_SIZE"]), "losses": [h["loss"] for h in res.history]})
# one file per rank: the ranks share the launcher's stdout, where their lines can interleave
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as fh:
    json.dump(report, fh)
dist.destroy_process_group()
