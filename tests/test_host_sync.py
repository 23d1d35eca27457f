"""The training steps that draw on the host (mixing permutations and grid layouts, LTML's class weights) send what
they draw to the device without a blocking copy: on CUDA a plain ``.to(device)`` of ordinary host memory waits for
every queued kernel, a host sync per step. The ``meta`` device stands in for a GPU here; on CUDA
:func:`~mlic_lib.utils.host_to_device` also pins the buffer."""

from __future__ import annotations

import pytest
import torch

from mlic_lib.ltml import LTMLStep, ltml_class_weights
from mlic_lib.models import build_model
from mlic_lib.models.ltml import build_two_branch
from mlic_lib.splicemix_cl import MosaicStep, make_step
from mlic_lib.utils import BlockingCopies, host_to_device

META = torch.device("meta")


def _blocking_copies(step, model, batch) -> int:
    with BlockingCopies() as mode:
        for _ in range(2):  # the first step may move state once (LTML's weights): count both
            loss, _ = step(model, batch, META)
    assert loss.device == META
    return mode.count


@pytest.mark.parametrize("method", ["mixup", "cutmix", "batch_aug", "splicemix", "splicemix_cl"])
def test_mixing_steps_make_no_blocking_host_copy(method):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, device=META), torch.zeros(8, 5, device=META)
    model = build_model("small_resnet", 5, widths=(4, 8, 8, 8)).to(META)
    assert _blocking_copies(make_step(method), model, [x, y]) == 0


def test_mosaic_and_ltml_steps_make_no_blocking_host_copy():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, device=META), torch.zeros(8, 5, device=META)
    boxes = torch.zeros(8, 1, 5, dtype=torch.long, device=META)  # after the engine's host_batch hook
    model = build_model("small_resnet", 5, widths=(4, 8, 8, 8)).to(META)
    assert _blocking_copies(MosaicStep(torch.zeros(8, 1, 5)), model, [x, y, torch.arange(8, device=META), boxes]) == 0
    pos_weight, neg_weight = ltml_class_weights([3, 5, 1, 2, 4], 10)
    two = build_two_branch("small_resnet", 5, widths=(4, 8, 8, 8)).to(META)
    assert _blocking_copies(LTMLStep(pos_weight, neg_weight), two, [x, y, x, y]) == 0


@pytest.mark.parametrize("kd_subtask_only", [True, False])
def test_distillation_with_teachers_on_each_batch_makes_no_blocking_host_copy(kd_subtask_only):
    """CPSD's student on augmented images runs its teacher ensembles on every batch (the ``full`` recipe): their
    rho index and Eq. 5's class -> subset map used to go to the device once per step and per subset."""
    from mlic_lib.psd import DistillationStep, TeacherEnsemble

    torch.manual_seed(0)
    subsets = [[0, 2], [1, 3, 4]]
    x, y = torch.randn(8, 3, 32, 32, device=META), torch.zeros(8, 5, device=META)
    ensembles = [TeacherEnsemble([build_model("small_resnet", len(s), widths=(4, 8, 8, 8)) for s in subsets],
                                 subsets, 5).to(META) for _ in range(2)]
    model = build_model("small_resnet", 5, widths=(4, 8, 8, 8)).to(META)
    step = DistillationStep(teachers=ensembles, kd_subtask_only=kd_subtask_only)
    assert _blocking_copies(step, model, [x, y]) == 0


@pytest.mark.parametrize("options", [{}, {"norm": "minmax"}, {"pairing": "each"}, {"default_pairs_disparate": False}])
def test_indeed_steps_make_no_blocking_host_copy_and_no_data_dependent_op(options):
    """INDeeD's pairs come from its host_batch hook (the engine sends them with the batch). Leaving the default
    pairs out of L_S used a boolean index and ``len()`` of its result: a host sync per step (on ``meta`` it raises)."""
    from mlic_lib.indeed import INDeeDStep, build_indeed_model

    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 42, 42), torch.zeros(8, 10)
    for i in range(8):
        y[i, torch.randperm(10)[:3]] = 1
    step = INDeeDStep(**options)
    batch = [t.to(META) for t in step.host_batch([x, y])]
    model = build_indeed_model({"name": "simple_cnn", "widths": [8, 16, 16], "hidden": 32}, 10, 1, 42).to(META)
    assert _blocking_copies(step, model, batch) == 0


def test_host_to_device_keeps_values_and_skips_a_tensor_already_there():
    t = torch.arange(6).view(2, 3)
    assert host_to_device(t, "cpu") is t
    if torch.cuda.is_available():  # the pinned, non-blocking path
        out = host_to_device(t, "cuda")
        assert out.device.type == "cuda" and torch.equal(out.cpu(), t)


def test_blocking_copies_counts_a_plain_copy_to_the_device_and_not_a_non_blocking_one():
    with BlockingCopies() as copies:
        torch.ones(3).to(META)
        torch.ones(3).to(META, non_blocking=True)
        torch.ones(3).to("cpu")
        host_to_device(torch.ones(3), META)
    assert copies.count == 1


def test_blocking_copies_counts_python_data_sent_to_the_device_and_a_host_index():
    """Copies that bypass ``_to_copy``/``copy_``: a tensor built from Python data on the device, ``new_tensor``,
    and a device tensor indexed with a host index (which is copied to the device first). They were counted as
    none, so the check could not catch such a copy added to a step."""
    x = torch.ones(4, device=META)
    host_index = torch.arange(4).flip(0)
    cases = {
        "torch.tensor": lambda: torch.tensor([0.5, 2.0], device=META),
        "torch.as_tensor": lambda: torch.as_tensor([0.5, 2.0], device=META),
        "new_tensor": lambda: x.new_tensor([2.0]),
        "host index": lambda: x[host_index],
    }
    for name, make in cases.items():
        with BlockingCopies() as copies:
            make()
        assert copies.count == 1, name
    with BlockingCopies() as copies:  # none of these copies host memory to the device
        torch.tensor([0.5, 2.0])
        x * torch.tensor(2.0)  # a 0-d host tensor is a scalar argument, not a copy
        x[torch.arange(4, device=META)]
        torch.zeros(3, device=META)
    assert copies.count == 0


def test_a_float_log_is_not_sent_to_the_device_each_step():
    """train_one_epoch summed every logged value with torch.as_tensor(v, device=device): for a step that logs a
    Python float (which the step contract allows) that is a blocking copy, a host sync, at every step."""
    import mlic_lib.engine as engine
    from mlic_lib.engine import SupervisedStep, train_one_epoch

    class FloatLogStep(SupervisedStep):
        def __call__(self, model, batch, device):
            loss, _ = super().__call__(model, batch, device)
            return loss, {"scale": 0.5}

    model = build_model("small_resnet", 5, widths=(4, 8, 8, 8)).to(META)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [[torch.randn(4, 3, 32, 32), torch.zeros(4, 5)] for _ in range(6)]
    with pytest.MonkeyPatch.context() as mp, BlockingCopies() as copies:
        mp.setattr(engine, "_finite_on_every_rank", lambda loss: True)  # the per-interval check reads the loss
        with pytest.raises(NotImplementedError):  # the epoch's closing read of the sums: meta has no data
            train_one_epoch(model, batches, opt, FloatLogStep(), META, log_every=1000)
    assert copies.count <= 1, copies.count  # the epoch's step counts, once; not one per step


def test_blocking_copies_reads_keyword_data_the_default_device_and_a_positional_non_blocking():
    """new_tensor(data=...) raised IndexError inside the detector; Python data sent to the default device (or with
    device=None to new_tensor's own) counted none; copy_ / _foreach_copy_ with non_blocking=True (positional under
    the dispatcher) counted as blocking."""
    x = torch.zeros(3, device=META)
    with BlockingCopies() as copies:
        torch.zeros(3).new_tensor(data=[1.0])
    assert copies.count == 0
    with BlockingCopies() as copies:
        x.new_tensor([1.0, 2.0], device=None)
    assert copies.count == 1
    with torch.device(META), BlockingCopies() as copies:
        torch.tensor([1.0, 2.0])
    assert copies.count == 1
    y, ys, src = torch.zeros(3, device=META), [torch.zeros(3, device=META)], torch.ones(3)
    for call, expected in ((lambda: y.copy_(src, non_blocking=True), 0), (lambda: y.copy_(src), 1),
                           (lambda: torch._foreach_copy_(ys, [src], non_blocking=True), 0),
                           (lambda: torch._foreach_copy_(ys, [src]), 1)):
        with BlockingCopies() as copies:
            call()
        assert copies.count == expected
