"""The torchvision start-up hook: imports work on CPU torch, and it stays inactive where real ops load."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mlic_lib import _torchvision_compat as compat


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def _hook_installed() -> bool:
    return (Path(sysconfig.get_paths()["purelib"]) / compat.PTH_NAME).is_file()


def test_pth_hook_is_installed_in_this_environment():
    pth = Path(sysconfig.get_paths()["purelib"]) / compat.PTH_NAME
    if not pth.is_file():
        pytest.skip("not running inside the project's .venv (make test installs the hook)")
    assert pth.read_text() == compat.pth_line()


def test_torchvision_timm_and_gradcam_import():
    state = _run(
        "import torchvision, timm, pytorch_grad_cam, torch\n"
        "import mlic_lib._torchvision_compat as c\n"
        "assert hasattr(torch.ops.torchvision, 'nms')\n"
        "timm.create_model('resnet10t', pretrained=False)\n"
        "print(c.STATE)"
    )
    # without the .pth (a plain `pip install -e .`, e.g. on a CUDA machine) the hook never runs, and need not
    assert state in ({"fallback", "real-ops"} if _hook_installed() else {"not-triggered"})


def test_hook_stays_inactive_when_real_ops_load():
    out = _run(
        "import torch, mlic_lib._torchvision_compat as c\n"
        "c._real_ops_load = lambda origin: True\n"
        "print(c.patch_now(), c._LIBRARY is None)"
    )
    assert out == "real-ops True"


def test_fallback_registers_working_ops_when_real_ops_fail():
    if _run("import mlic_lib._torchvision_compat as c\nprint(c.patch_now())") == "real-ops":
        # faking a failure here would register the ops twice when torchvision then loads its own
        pytest.skip("torchvision's compiled ops load here; the fallback is for builds where they cannot")
    out = _run(
        "import torch, mlic_lib._torchvision_compat as c\n"
        "c._real_ops_load = lambda origin: False\n"
        "print(c.patch_now())\n"
        "b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30.]])\n"
        "print(torch.ops.torchvision.nms(b, torch.tensor([.9, .8, .7]), 0.5).tolist())\n"
        "import torchvision\n"
    )
    assert out.splitlines() == ["fallback", "[0, 2]"]


@pytest.mark.parametrize("tied", [False, True])
def test_nms_reference_matches_brute_force(tied):
    """With tied scores (``tied``) the box of lower index comes first, as in torchvision's kernel (a stable sort):
    the fallback's unstable sort used to keep other boxes."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(60, 2, generator=g) * 20], 1)
    scores = torch.randint(0, 3, (60,), generator=g).float() if tied else torch.rand(60, generator=g)
    keep = compat.nms_reference(boxes, scores, 0.4).tolist()

    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    expected = []
    for i in sorted(range(60), key=lambda i: -scores[i].item()):
        if all(iou(boxes[i].tolist(), boxes[j].tolist()) <= 0.4 for j in expected):
            expected.append(i)
    assert keep == expected
    assert compat.nms_reference(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_the_start_up_hook_leaves_the_package_unimported(tmp_path):
    """The .pth used to import ``mlic_lib._torchvision_compat`` at interpreter start, which pinned ``mlic_lib`` to the
    installed checkout: ``python -m pytest`` in another clone then tested the installed one's code. The hook now
    loads its file as a top-level module, so a ``mlic_lib`` in the working directory is the one imported."""
    other = tmp_path / "mlic_lib"
    other.mkdir()
    (other / "__init__.py").write_text("OTHER = True\n")
    out = subprocess.run([sys.executable, "-c", "import sys; print('mlic_lib' in sys.modules); import mlic_lib; "
                          "print(getattr(mlic_lib, 'OTHER', False))"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]
