"""DDP under torchrun: two CPU processes (gloo) train in lockstep; only rank 0 writes the run folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def _torchrun(tmp_path: Path, mode: str) -> list[dict]:
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path / "run"), str(tmp_path), mode]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CPU processes (gloo) on a GPU machine too: two ranks, one GPU
    env["TMPDIR"] = str(tmp_path)  # torchrun's torchelastic_* folders, which it leaves behind, go with the test's
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too, not only the launcher
        proc.communicate()
        pytest.fail("torchrun did not finish within 240 s")
    assert proc.returncode == 0, stderr[-3000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    return rows


@pytest.mark.slow
def test_fit_under_torchrun_keeps_ranks_in_sync(tmp_path):
    rows = _torchrun(tmp_path, "plain")
    assert all(r["same"] and r["epochs"] == 2 and r["world"] == 2 for r in rows), rows
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / "final.pt").is_file()
    # the history's loss is the mean over both ranks' shards (it was rank 0's own), and the folder records
    # that two processes trained it (a resume in another number is refused: test_engine)
    assert rows[0]["losses"] == rows[1]["losses"], rows
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["world_size"] == 2
    # validation is split between the ranks (15 + 16 of 31 images, each scored once); every rank gathers the
    # whole set's scores in order (those of one process alone, up to float rounding of other batch shapes) and
    # reports the same mAP
    assert sorted(r["val_images_scored"] for r in rows) == [15, 16], rows
    assert all(r["sharded_targets_in_order"] and r["sharded_vs_single_max_diff"] < 1e-5 for r in rows), rows
    assert rows[0]["final_mAP"] == rows[1]["final_mAP"] == rows[0]["sharded_mAP"] == rows[1]["sharded_mAP"], rows
    # one image for two ranks: rank 0's share is empty, and both still get that image's scores
    assert rows[0]["one_image_scores"] == rows[1]["one_image_scores"] and len(rows[0]["one_image_scores"]) == 1
    assert all(r["one_image_max_diff"] < 1e-5 for r in rows), rows


@pytest.mark.slow
def test_ltml_under_torchrun_shards_the_two_streams_and_tolerates_unused_parameters(tmp_path):
    """The branch-ensemble variant and the single-branch baseline leave parameters without gradient (DDP must be
    told), a single branch with compensation is refused clearly, and the two-stream loader must give the ranks
    different batches."""
    rows = _torchrun(tmp_path, "ltml")
    assert all(r["same"] and r["epochs"] == 2 for r in rows), rows
    assert rows[0]["steps"] == rows[1]["steps"] == 64 // 8 // 2
    assert not set(rows[0]["uniform_epoch0"]) & set(rows[1]["uniform_epoch0"])
    assert all(r["baseline_u_epochs"] == 1 for r in rows), rows
    assert all(r[f"{v}_same"] and r[f"{v}_mu_moved"] > 0 for r in rows for v in ("full", "full_shared")), rows
    assert all("cannot train under DDP" in (r["single_branch_compensation_error"] or "") for r in rows), rows
    assert (tmp_path / "run" / "results.json").is_file()


@pytest.mark.slow
def test_splicemix_cl_trains_under_torchrun_through_the_wrapper(tmp_path):
    """SpliceMix-CL needs the feature map of the spliced batch: it used to call the model's forward_features,
    which a DDP wrapper has not (a ValueError), and calling the wrapped module's would skip the gradient sync."""
    rows = _torchrun(tmp_path, "splicemix")
    assert all(r["same"] and r["epochs"] == 2 for r in rows), rows
    assert all(v is not None and v > 0 for r in rows for v in r["loss_cl"]), rows


@pytest.mark.slow
def test_a_key_logged_on_one_rank_only_is_averaged_over_the_ranks_that_logged_it(tmp_path):
    """The epoch's means are all-reduced as one stack: a key one rank logged and another did not used to pair
    different keys (or hang with stacks of different lengths). Now the ranks agree on the keys first."""
    rows = _torchrun(tmp_path, "keys")
    logged = [{k: v for k, v in r["history"][0].items() if k != "train_seconds"} for r in rows]  # the clocks differ
    assert logged[0] == logged[1] and logged[0]["rank1_only"] == 1.0, rows


@pytest.mark.slow
def test_ranks_draw_different_augmentations_and_resume_their_own_streams(tmp_path):
    """Every rank used to seed its RNG alike, so random augmentations were the same on every GPU; and a resumed
    run must go on with each rank's own streams (a checkpoint holds them all), not rank 0's. The runs keep an EMA
    of the weights: it is the same on both ranks, and the resumed run ends on the uninterrupted run's weights."""
    rows = _torchrun(tmp_path, "seeds")
    assert all(len(r["draws"]) == 2 * (64 // 16 // 2) for r in rows), rows  # 2 epochs x 2 batches per rank
    assert rows[0]["draws"] != rows[1]["draws"]
    assert all(r["draws_interrupted_and_resumed"] == r["draws"] for r in rows), rows
    assert all(r["same"] and r["resumed_same_weights"] for r in rows), rows
    assert all(r["resumed_history"] == r["losses"] for r in rows), rows


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    """Rank 1's loss is NaN at the first step: rank 0 used to go on into the gradient all-reduce and wait there
    until torchrun tore it down; both now raise FloatingPointError at that step."""
    rows = _torchrun(tmp_path, "nan")
    assert "loss became nan at step 0" in rows[1]["error"], rows
    assert "another DDP rank was not finite" in rows[0]["error"] and "at step 0" in rows[0]["error"], rows
