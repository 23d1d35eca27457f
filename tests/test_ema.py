"""WeightEMA against torch's AveragedModel(get_ema_multi_avg_fn, use_buffers=True): same numbers, same state_dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mlic_lib.ema import WeightEMA
from mlic_lib.models import build_model


def _train_steps(model: nn.Module, averages, n: int = 5) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = torch.randn(6, 3, 16, 16, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for a in averages:
            a.update_parameters(model)


def test_weight_ema_is_torchs_ema_with_buffers():
    torch.manual_seed(0)
    model = build_model("small_resnet", 4, widths=(4, 4, 8, 8)).train()  # BatchNorm: float and integer buffers
    ours, torchs = WeightEMA(model, 0.7), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.7), use_buffers=True)
    _train_steps(model, (ours, torchs))
    a, b = ours.state_dict(), torchs.state_dict()
    assert list(a) == list(b)  # module.* and n_averaged: checkpoints load either way
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7, msg=k)
    assert int(a["n_averaged"]) == 5
    assert not torch.equal(a["module.classifier.weight"], model.classifier.weight.detach())  # it averages


def test_weight_ema_resumes_from_its_state_dict():
    """A checkpoint's average goes on exactly: the update count comes back with n_averaged (the first update after
    a resume must lerp, not copy)."""
    torch.manual_seed(0)
    model = build_model("small_resnet", 4, widths=(4, 4, 8, 8))
    whole = WeightEMA(model, 0.5)
    _train_steps(model, (whole,), n=2)
    resumed = WeightEMA(model, 0.5)
    resumed.load_state_dict(whole.state_dict())
    for ema in (whole, resumed):
        ema.update_parameters(model)
    for (k, x), y in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)


def test_weight_ema_refuses_a_bad_decay_and_another_model():
    model = nn.Linear(3, 2)
    for bad in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match="decay must be in"):
            WeightEMA(model, bad)
    with pytest.raises(ValueError, match="the model it was made from"):
        WeightEMA(model, 0.9).update_parameters(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)))


def test_the_average_survives_a_resume_through_a_parent_module():
    """A training script that keeps its model and the EMA in one module loads them with the parent's
    load_state_dict, which never calls WeightEMA.load_state_dict: the update counter stayed 0, and the next update
    copied the model over the restored average."""
    import io

    class Trainer(nn.Module):
        def __init__(self, model: nn.Module):
            super().__init__()
            self.model, self.ema = model, WeightEMA(model, decay=0.9)

    torch.manual_seed(0)
    t = Trainer(nn.Linear(3, 3))
    for _ in range(5):
        with torch.no_grad():
            t.model.weight.add_(1.0)
        t.ema.update_parameters(t.model)
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    t2 = Trainer(nn.Linear(3, 3))
    t2.load_state_dict(torch.load(buf, weights_only=True))
    assert t2.ema._updates == 5
    avg = t2.ema.module.weight.detach().clone()
    t2.ema.update_parameters(t2.model)
    torch.testing.assert_close(t2.ema.module.weight, 0.9 * avg + 0.1 * t2.model.weight)
    assert int(t2.ema.n_averaged) == 6
