"""Make ``import torchvision`` work when its compiled ops cannot load (CPU torch + CUDA torchvision).

On this project's CPU machines the only torchvision wheel matching ``torch==2.13.0`` is a CUDA
build. Its ``_C`` extension needs ``libtorch_cuda`` and fails to load; torchvision then still
registers fake (meta) kernels for ``torchvision::nms`` and ``torchvision::qnms``, which raises
``RuntimeError: operator torchvision::nms does not exist`` and makes ``import torchvision`` (and so
``timm`` and ``pytorch_grad_cam``) fail.

:func:`install` puts a tiny finder on ``sys.meta_path``. The first time anything imports
``torchvision`` the finder removes itself and tries to load torchvision's real ``_C`` extension.
Only if that fails does it define the two operator schemas with a pure-PyTorch CPU kernel
(greedy NMS), so the registration succeeds. Where the real ops load (a CUDA machine, a matching
CPU build) nothing is defined: :data:`STATE` then reads ``"real-ops"``.

The set-up (``make``) installs a ``.pth`` file that, at interpreter start, loads this file by its path as the
top-level module :data:`HOOK_MODULE` (not through the ``mlic_lib`` package, which it leaves unimported) and calls
:func:`install`. It costs nothing more until torchvision is imported. ``torchvision.io.decode_jpeg/read_image`` stay
unavailable with the fallback: decode images with PIL.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

#: ``"not-triggered"`` until torchvision is first imported, then ``"real-ops"`` (the compiled
#: extension loaded, nothing patched) or ``"fallback"`` (pure-PyTorch nms/qnms registered).
STATE = "not-triggered"
_LIBRARY = None  # keeps the torch.library.Library alive


def nms_reference(boxes, scores, iou_threshold: float):
    """Greedy non-maximum suppression in plain PyTorch (same contract as ``torchvision.ops.nms``).

    Boxes are ``(N, 4)`` in ``(x1, y1, x2, y2)``; returns the kept indices sorted by decreasing score.
    """
    import torch

    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)  # as torchvision: ties keep the lower index first
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas - inter).clamp(min=torch.finfo(torch.float32).tiny)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def _qnms_reference(boxes, scores, iou_threshold: float):
    return nms_reference(boxes.dequantize(), scores.dequantize(), iou_threshold)


def _real_ops_load(origin: str | None) -> bool:
    """Try to load torchvision's compiled ``_C`` extension; True when it loads."""
    import torch

    if origin is None:
        return False
    candidates = sorted(Path(origin).parent.glob("_C*.so")) + sorted(Path(origin).parent.glob("_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(str(candidates[0]))
    except (OSError, RuntimeError, ImportError):
        return False
    return True


def _register_fallback() -> None:
    import torch

    global _LIBRARY
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", nms_reference, "CPU")
    lib.impl("qnms", _qnms_reference, "QuantizedCPU")
    _LIBRARY = lib


def patch_now() -> str:
    """Run the check immediately (torchvision must not be imported yet). Returns :data:`STATE`."""
    global STATE
    if STATE != "not-triggered":
        return STATE
    uninstall()  # find_spec below must not re-enter the finder
    spec = importlib.util.find_spec("torchvision")
    if spec is None:  # torchvision not installed: nothing to do
        STATE = "real-ops"
        return STATE
    if _real_ops_load(spec.origin):
        STATE = "real-ops"
    else:
        _register_fallback()
        STATE = "fallback"
    return STATE


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        uninstall()
        try:
            patch_now()
        except Exception as err:  # never break the import itself
            print(f"mlic_lib: torchvision compatibility check failed: {err!r}", file=sys.stderr)
        return None  # let the regular finders import torchvision


def install() -> None:
    """Arm the hook (idempotent). Has no effect if torchvision is already imported."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionFinder)]


PTH_NAME = "mlic_torchvision_compat.pth"
#: The name the ``.pth`` file loads this file under at interpreter start: a top-level one, so that the hook does not
#: import the ``mlic_lib`` package (which would pin it to the installed checkout before the working directory is on
#: ``sys.path``: ``python -m pytest`` in another clone would then test the installed clone's code).
HOOK_MODULE = "_mlic_torchvision_hook"


def pth_line(source: str | os.PathLike | None = None) -> str:
    """The ``.pth`` line that loads ``source`` (default: this file) as :data:`HOOK_MODULE` and calls
    :func:`install`; a missing or broken file is skipped (torchvision then imports without the hook)."""
    code = ("try:\n"
            " import importlib.util as u\n"
            f" if {HOOK_MODULE!r} not in sys.modules:\n"  # a venv's lib64 -> lib link reads the .pth twice
            f"  s = u.spec_from_file_location({HOOK_MODULE!r}, {str(source or Path(__file__).resolve())!r})\n"
            "  m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m); m.install()\n"
            "except Exception:\n"
            f" sys.modules.pop({HOOK_MODULE!r}, None)\n")
    return f"import sys; exec({code!r})\n"


def write_pth(site_dir: str | None = None) -> Path:
    """Install the start-up hook: a ``.pth`` file in ``site_dir`` (default: this interpreter's purelib)."""
    import sysconfig

    target = Path(site_dir or sysconfig.get_paths()["purelib"]) / PTH_NAME
    line = pth_line()
    if not target.is_file() or target.read_text() != line:
        target.write_text(line)
    return target


def _adopt_start_up_hook() -> None:
    """Imported as ``mlic_lib._torchvision_compat`` after the ``.pth`` loaded :data:`HOOK_MODULE`: when that is this
    very file, become it (one STATE: the import system returns what ``sys.modules`` holds); when it is another
    checkout's copy (two clones sharing one environment), this checkout's module takes the hook over if torchvision
    has not been imported yet, else keeps the state the other copy reached."""
    global STATE
    hook = sys.modules.get(HOOK_MODULE)
    if __name__ == HOOK_MODULE or not isinstance(hook, type(sys)):
        return
    if Path(getattr(hook, "__file__", "") or "").resolve() == Path(__file__).resolve():
        sys.modules[__name__] = hook
    elif getattr(hook, "STATE", None) == "not-triggered":
        hook.uninstall()
        install()
    else:
        STATE = hook.STATE


_adopt_start_up_hook()


if __name__ == "__main__":
    print(f"installed {write_pth()}")
