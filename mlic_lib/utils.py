"""Small shared helpers: seeding, atomic writes, config hashing, device choice."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import random
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_PACKAGE_DIR = Path(__file__).resolve().parent


def _package_sources() -> dict[Path, tuple[int, int, bytes]]:
    """``(mtime_ns, size, content)`` of every ``.py`` file of the package (about 0.6 MB)."""
    out = {}
    for f in _PACKAGE_DIR.rglob("*.py"):
        with contextlib.suppress(OSError):
            st = f.stat()
            out[f] = (st.st_mtime_ns, st.st_size, f.read_bytes())
    return out


#: The package's source files as this process first saw them (when it imported this module, which nearly every
#: module of the package imports at its top): :func:`library_digest` refuses to key a run with code changed since.
_SOURCE_AT_IMPORT = _package_sources()


def bar_disabled(progress: bool) -> bool:
    """``disable=`` for a tqdm bar: off when the caller asks for no progress, and whenever the environment
    sets ``TQDM_DISABLE`` (the book build does: frozen bars are noise in executed notebooks). tqdm itself
    lets an explicit ``disable=False`` win over that variable."""
    return not progress or os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch (all devices); return a CPU generator seeded with ``seed``."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` gives CUDA when available, else CPU; anything else is passed to torch."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``, for small tensors drawn on the host during a step (a permutation, a grid layout). A
    plain ``.to("cuda")`` of ordinary host memory waits for every kernel already queued, a host sync per step; a
    pinned copy goes out without waiting (the pinned buffer is not reused before the copy is done)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    # Other accelerators get a plain copy: a non-blocking one of ordinary host memory can read the source after it
    # is freed and silently give wrong values on MPS (pytorch/pytorch#139550, #189690). "meta" moves no data, so
    # there it is non-blocking too, as on CUDA: tests count the blocking copies a step makes on it.
    return t.to(device, non_blocking=device.type == "meta")


class BlockingCopies(TorchDispatchMode):
    """A context that counts the copies from the CPU to another device made without ``non_blocking`` (what
    :func:`host_to_device` avoids): ``with BlockingCopies() as copies: step(...)``, then ``copies.count``. On the
    ``meta`` device, which stands in for a GPU in tests, each such copy would be a host sync on CUDA. Counted: a
    ``.to(device)`` / ``copy_`` from the CPU, a device op given a CPU operand that is not 0-d (an index, which is
    copied to the device first), and Python data made on the device (``torch.tensor``, ``as_tensor``,
    ``new_tensor``; :class:`_PythonDataToDevice`)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # copy_ and _foreach_copy_ get non_blocking as a positional argument, _to_copy as a keyword
        non_blocking = kwargs.get("non_blocking", False) or any(
            a.name == "non_blocking" and i < len(args) and args[i] for i, a in enumerate(func._schema.arguments))
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0], kwargs.get("device")
        elif func is torch.ops.aten.copy_.default:
            src, dst = args[1], args[0].device
        else:
            src = dst = None
        if (isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst is not None
                and torch.device(dst).type != "cpu" and not non_blocking):
            self.count += 1
        elif src is None and not non_blocking:  # a CPU operand (not 0-d) of a device op, e.g. an index: copied to it
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            on_cpu = [t.device.type == "cpu" for t in tensors]
            if not all(on_cpu) and any(c and t.dim() for c, t in zip(on_cpu, tensors, strict=True)):
                self.count += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._python_data = _PythonDataToDevice(self)
        self._python_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._python_data.__exit__(*exc)


class _PythonDataToDevice(TorchFunctionMode):
    """``torch.tensor`` / ``torch.as_tensor`` of Python data with a device, and ``Tensor.new_tensor``: they copy
    host memory to the device below the dispatcher's Python key, where :class:`BlockingCopies` cannot see them."""

    def __init__(self, copies: BlockingCopies):
        super().__init__()
        self.copies = copies

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor):
            new = func is torch.Tensor.new_tensor
            rest = args[1:] if new else args  # the data, positional or data=...
            data = rest[0] if rest else kwargs.get("data")
            device = kwargs.get("device")  # None: the tensor's device (new_tensor) or the default device
            if device is None:
                device = args[0].device if new else torch.get_default_device()
            if (device is not None and torch.device(device).type != "cpu"
                    and not isinstance(data, torch.Tensor | np.ndarray)):  # those two reach the dispatcher
                self.copies.count += 1
        return func(*args, **kwargs)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model lives: the device of its first parameter (or buffer); the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def distributed_info() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the variables ``torchrun`` sets; ``(1, 0, 0)`` otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def env_path(name: str, default: str | os.PathLike) -> Path:
    """``$name`` as a path (``~`` expanded), or ``default`` when the variable is unset or empty (an empty value
    would otherwise mean the working directory)."""
    return Path(os.environ.get(name) or default).expanduser()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # e.g. a platform without directory handles
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str):
    """Open a temporary file next to ``path``; on success fsync and rename it over ``path``, then fsync the folder
    (so the rename itself survives a power cut).

    An exception mid-write (``KeyboardInterrupt`` included) leaves the previous file intact and removes the
    temporary file. A process killed mid-write (SIGKILL, the OOM killer, a power cut) also leaves the previous file
    intact, but can leave its temporary file ``.<name>.XXXXXXXX.tmp`` behind (``tempfile.mkstemp``'s name: 8
    random characters); :func:`mlic_lib.engine.fit` removes such leftovers of its own files from a run folder
    when it next runs there (:func:`mlic_lib.engine.remove_stale_temp_files`). The file gets the permissions a
    plain ``open`` would give (``mkstemp``'s are owner-only, which would lock other users out of a shared
    cache)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            with contextlib.suppress(OSError):  # a file system without modes (vfat, some network mounts)
                os.fchmod(fh.fileno(), 0o666 & ~_UMASK)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # ENOSPC, EDQUOT, EIO: say where
            raise OSError(e.errno, f"{e.strerror}: could not write {path} (nothing was changed there)") from e
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous file intact, never a truncated checkpoint (a killed process may leave
    its temporary file behind: see :func:`atomic_open`).
    """
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write text atomically (temporary file + rename)."""
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _digest(arr: np.ndarray) -> dict[str, Any]:
    arr = np.ascontiguousarray(arr)
    return {"sha256": hashlib.sha256(arr.tobytes()).hexdigest(), "shape": list(arr.shape), "dtype": str(arr.dtype)}


def _tensor_digest(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu()
    out = _digest((t.float() if t.dtype == torch.bfloat16 else t).numpy())  # NumPy has no bfloat16
    out["dtype"] = str(t.dtype)
    return out


def _code_key(code, depth: int) -> dict[str, Any]:
    """A function's compiled code, without memory addresses: its bytecode, names and constants (nested code
    objects, e.g. of an inner lambda, recursively)."""
    consts = [_code_key(c, depth + 1) if hasattr(c, "co_code") else object_key(c, depth + 1) for c in code.co_consts]
    return {"bytecode": hashlib.sha256(code.co_code).hexdigest(), "names": list(code.co_names), "consts": consts}


def _user_code(module: str | None) -> bool:
    """Whether ``module`` is a user's code, keyed by its bytecode: not mlic_lib (its source is in every key through
    :func:`library_digest`) and not installed with Python (a built-in, the standard library, site-packages: pandas,
    PIL, timm, ... change with their version, not in a notebook, and following the globals of their code reaches
    most of the package, minutes for a DataFrame)."""
    top = (module or "").split(".")[0]
    return top not in ("mlic_lib", "torch", "builtins") and not _installed_module(module or "")


def _installed_module(module: str) -> bool:
    """Whether ``module`` was imported from the Python installation (a built-in, the standard library or a
    site-packages folder). A notebook's or script's ``__main__``, a module next to it (a test module, a user's
    helpers) and a namespace that is no imported module (code run with ``exec``) are not."""
    import sys

    if module == "__main__":
        return False
    mod = sys.modules.get(module)
    return False if mod is None else _installed_file(module, getattr(mod, "__file__", None))


@functools.lru_cache(maxsize=1024)
def _installed_file(module: str, file: str | None) -> bool:
    import site
    import sys
    import sysconfig

    if not file:
        return module in sys.builtin_module_names or module.split(".")[0] in sys.stdlib_module_names
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else ())
    path = os.path.realpath(file)
    return any(os.path.commonpath([path, os.path.realpath(r)]) == os.path.realpath(r) for r in roots)


def _globals_read(code) -> set[str]:
    """The module-level names a code object (and the code nested in it) reads."""
    import dis

    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            names |= _globals_read(c)
    return names


def _globals_key(fn, depth: int) -> dict[str, Any]:
    """The values of the module-level names a user's function (:func:`_user_code`) reads (a notebook's constants,
    loss objects, helper functions): its bytecode names them but does not change when they do."""
    if not _user_code(getattr(fn, "__module__", None)):
        return {}
    out: dict[str, Any] = {}
    for name in sorted(_globals_read(fn.__code__)):
        if name not in fn.__globals__:
            continue  # a builtin
        value = fn.__globals__[name]
        if inspect.ismodule(value):
            out[name] = f"module {value.__name__}"
        elif value is fn:
            out[name] = "itself"
        else:
            try:
                out[name] = object_key(value, depth + 1)
            except TypeError:  # nothing to look into, or a cycle of functions: its type at least
                out[name] = f"{type(value).__module__}.{type(value).__qualname__}"
    return out


def _class_code(cls: type, depth: int) -> dict[str, Any]:
    """The code of the methods (and the globals they read) of ``cls`` and its bases that are a user's code
    (:func:`_user_code`): a notebook's step or model class, whose name alone stays the same when its ``__call__``
    or ``forward`` is edited."""
    out: dict[str, Any] = {}
    for c in cls.__mro__:
        if not _user_code(getattr(c, "__module__", None)):
            continue
        for attr, v in sorted(vars(c).items()):
            f = v.fget if isinstance(v, property) else getattr(v, "__func__", v)  # static/class methods too
            if inspect.isfunction(f):
                out[f"{c.__qualname__}.{attr}"] = {"code": _code_key(f.__code__, depth + 1),
                                                   "globals": _globals_key(f, depth + 1)}
    return out


def object_key(obj: Any, _depth: int = 0) -> Any:
    """A JSON-able description of what ``obj`` (e.g. a training step) computes with, for a run's cache key, the same
    in every process: plain values as they are; an array or tensor by a digest of its values; a module by its class,
    its options (public attributes, e.g. a loss's ``gamma_neg``), its submodules and a digest of its state; a
    function by its name, code, defaults, closure and the module-level names it reads (a bound method with its
    object); any other object by its class and its public attributes or slots (those not starting with ``_``:
    caches such as a per-device copy stay out), recursively. A user's class (a notebook's step or model; not
    mlic_lib, not an installed package) counts by the code of its methods too, so editing it retrains. Two steps of one
    class with other options (``Mixup(alpha=0.2)`` and ``Mixup(alpha=4.0)``) get other keys. An object it cannot
    look into (no attributes, and a ``repr`` holding a memory address) is a ``TypeError``: key the run on its
    settings yourself (e.g. ``train_scene_model``'s ``extra_key``)."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if _depth > 12:
        raise TypeError(f"object_key: {type(obj).__qualname__} is nested too deeply to key; pass its settings instead")
    d = _depth + 1
    if isinstance(obj, Mapping):
        return {str(k): object_key(v, d) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=repr) if isinstance(obj, set | frozenset) else obj
        return [object_key(v, d) for v in items]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return _digest(obj)
    if isinstance(obj, torch.Tensor):
        return _tensor_digest(obj)
    if isinstance(obj, torch.dtype | torch.device | np.dtype):
        return str(obj)
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, torch.nn.Module):
        attrs = {k: object_key(v, d) for k, v in sorted(vars(obj).items()) if not k.startswith("_") and k != "training"}
        return {"module": name, "options": attrs, "code": _class_code(type(obj), d),
                "buffers": {k: _tensor_digest(b) for k, b in obj._buffers.items()  # non-persistent ones too
                            if b is not None and k in obj._non_persistent_buffers_set},
                "children": {k: object_key(m, d) for k, m in obj.named_children()},  # each with its own state
                "state": {k: _tensor_digest(v) for k, v in obj.state_dict().items() if "." not in k}}
    if isinstance(obj, functools.partial):
        return {"partial": object_key(obj.func, d), "args": object_key(obj.args, d),
                "keywords": object_key(obj.keywords, d)}
    if inspect.ismethod(obj):
        return {"method": object_key(obj.__func__, d), "self": object_key(obj.__self__, d)}
    if inspect.isfunction(obj):
        cells = [c.cell_contents for c in (obj.__closure__ or ())]
        return {"function": f"{obj.__module__}.{obj.__qualname__}", "code": _code_key(obj.__code__, d),
                "defaults": object_key(obj.__defaults__, d), "kwdefaults": object_key(obj.__kwdefaults__, d),
                "closure": object_key(cells, d), "globals": _globals_key(obj, d)}
    if isinstance(obj, type) and _user_code(obj.__module__):  # a user's class: its name and its code
        return {"type": f"{obj.__module__}.{obj.__qualname__}", "code": _class_code(obj, d)}
    if isinstance(obj, type) or inspect.isbuiltin(obj):  # a class or a built-in function: its name says what it is
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    attrs = getattr(obj, "__dict__", None)
    slots = [s for c in type(obj).__mro__ for s in getattr(c, "__slots__", ()) if isinstance(s, str)]
    if attrs is None and not slots:
        text = repr(obj)
        if " at 0x" in text or " object at " in text:
            raise TypeError(f"object_key cannot look into {name} (no attributes, and its repr holds a memory "
                            "address): key the run on its settings instead (e.g. train_scene_model's extra_key)")
        return {"class": name, "repr": text}
    values = dict(attrs or {})
    values.update({s: getattr(obj, s) for s in slots if hasattr(obj, s)})
    return {"class": name, "_code": _class_code(type(obj), d),
            **{k: object_key(v, d) for k, v in sorted(values.items()) if not k.startswith("_")}}


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as pretty JSON atomically (NumPy/torch values converted to plain Python). A NaN or infinite
    number is written ``NaN`` / ``Infinity`` as Python's ``json`` does (read back as such by Python and pandas; not
    strict JSON, which has no such value: a missing number there would be indistinguishable from a ``null``
    setting)."""
    return atomic_write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True, allow_nan=True) + "\n", path)


class CorruptCheckpointError(ValueError):
    """A checkpoint whose stored data fail their CRC-32 (:func:`verify_checkpoint`): the file is damaged."""


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every record of the ``torch.save`` archive ``path`` against the CRC-32 the zip format stores for it;
    raise :class:`CorruptCheckpointError` naming the first record that fails (a flipped bit in the weights, which
    ``torch.load`` itself does not notice).

    A file that does not start as a zip archive does (torch's legacy format) is left to ``torch.load``, which
    raises for a damaged one; so is an archive written with ``torch.serialization.set_crc32_options(False)``, whose
    records carry no CRC-32 (all zero). Reads the whole file once (about 1.5 GB/s, so 0.1 s for ResNet-101's
    weights)."""
    path = Path(path)
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # what torch.save's archives start with (a legacy file may hold PK\5\6)
            return
        try:
            with zipfile.ZipFile(fh) as archive:
                if not any(r.CRC for r in archive.infolist() if r.file_size):
                    return  # written without CRC-32s: nothing to compare
                bad = archive.testzip()
        except (zipfile.BadZipFile, EOFError) as e:
            raise CorruptCheckpointError(f"{path.name}'s zip structure is damaged ({e})") from e
    if bad is not None:
        raise CorruptCheckpointError(f"{path.name}'s record {bad} fails its CRC-32: the file is damaged")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", verify: bool = True) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors, plain containers and numbers only), after
    :func:`verify_checkpoint` (``verify=False`` skips it)."""
    if verify:
        verify_checkpoint(path)
    return torch.load(path, map_location=map_location, weights_only=True)


def _in_package(name: str) -> bool:
    return name == "mlic_lib" or name.startswith("mlic_lib.")


def _module_file(name: str) -> Path | None:
    """The source file of ``mlic_lib`` module ``name`` (a package's ``__init__.py``), None if there is none."""
    if not _in_package(name):
        return None
    rel = Path(*name.split(".")[1:])
    candidates = [_PACKAGE_DIR / "__init__.py"] if name == "mlic_lib" else [
        _PACKAGE_DIR / rel.with_suffix(".py"), _PACKAGE_DIR / rel / "__init__.py"]
    return next((f for f in candidates if f.is_file()), None)


@functools.cache
def _imported_files(f: Path, mtime_ns: int, size: int) -> tuple[Path, ...]:
    """The ``mlic_lib`` source files a source file imports (including inside functions), with the packages above
    them. Cached per file version (``mtime_ns``, ``size``): parsing and resolving are most of a digest's cost,
    and an edited file is read again."""
    import ast

    parts = list(f.relative_to(_PACKAGE_DIR).with_suffix("").parts)
    package = ["mlic_lib", *parts[:-1]]  # the package a relative import starts from
    names: list[str] = []
    for node in ast.walk(ast.parse(f.read_bytes())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, one level up per extra dot
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    files: dict[Path, None] = {}
    for name in filter(_in_package, names):
        for i in range(2, name.count(".") + 2):  # the module and the packages above it
            m = _module_file(".".join(name.split(".")[:i]))
            if m is not None:
                files[m] = None
    return tuple(files)


def static_import_closure(roots: Iterable[str]) -> set[Path]:
    """The source files of the ``mlic_lib`` modules ``roots`` and of every ``mlic_lib`` module they import,
    transitively, read from the import statements (including those inside functions), without importing.
    Names outside ``mlic_lib`` are ignored; an ``mlic_lib`` name without a source file is an error (a
    misspelt root would silently leave its code out of a cache key)."""
    todo = [_PACKAGE_DIR / "__init__.py"]
    for r in roots:
        f = _module_file(r)
        if f is None and _in_package(r):
            raise ValueError(f"no mlic_lib module {r!r}: name an existing module (e.g. 'mlic_lib.engine')")
        if f is not None:
            todo.append(f)
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        st = f.stat()
        todo += [m for m in _imported_files(f, st.st_mtime_ns, st.st_size) if m not in seen]
    return seen


@functools.cache
def _code_digest(f: Path, mtime_ns: int, size: int) -> bytes:
    """sha256 of what a source file does: its syntax tree without docstrings (``ast.dump`` leaves out comments,
    layout and line numbers). Cached per file version (``mtime_ns``, ``size``) like :func:`_imported_files`."""
    return _tree_digest(f.read_bytes())


def _tree_digest(source: bytes) -> bytes:
    """:func:`_code_digest` of a file's content."""
    import ast

    tree = ast.parse(source)  # bytes: the file's own encoding (PEP 263), not the locale's
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                node.body = node.body[1:]
    return hashlib.sha256(ast.dump(tree).encode()).digest()


def _refuse_changed_loaded_code(files: Iterable[Path]) -> None:
    """A ``RuntimeError`` when a file of ``files`` belongs to a module this process has imported and its code
    changed on disk since: the process runs the old code, but a key from the files would name the new code, so the
    old code's results would be cached (and later loaded) as the new code's. An open kernel after an edit or a
    ``git pull`` is the usual case; a restart fixes it. An edit of docstrings, comments or layout only
    (:func:`_code_digest`) changes no key and is let through."""
    import sys

    loaded = {Path(m.__file__).resolve() for name, m in list(sys.modules.items())
              if _in_package(name) and getattr(m, "__file__", None)}
    changed = []
    for f in sorted(set(files) & loaded):
        with contextlib.suppress(OSError):
            st = f.stat()
            seen = _SOURCE_AT_IMPORT.get(f)
            if seen is not None and seen[:2] != (st.st_mtime_ns, st.st_size) and (
                    _tree_digest(seen[2]) != _code_digest(f, st.st_mtime_ns, st.st_size)):
                changed.append(str(f.relative_to(_PACKAGE_DIR)))
    if changed:
        raise RuntimeError(
            f"mlic_lib/{', mlic_lib/'.join(changed)} changed on disk after this process imported mlic_lib, so the "
            "code running here may be the old one while a cache key would name the new one (and store these "
            "results under it). Restart the kernel or the Python process to run the new code; importlib.reload is "
            "not enough (other modules keep the old functions).")


def library_digest(roots: Iterable[str] = ()) -> str:
    """sha256 over the code of :func:`static_import_closure` of the ``mlic_lib`` modules ``roots`` (with none,
    the package's ``__init__`` and what it imports): the same in every process, whatever it imported.

    Part of every cache key: :func:`mlic_lib.engine.run_dir_for` names its ``roots`` (the method's module and
    :data:`mlic_lib.engine.DATA_CODE`), so a change to the code a run uses retrains it, editing an unrelated
    module (another chapter's method, the figures, the reporting) does not, and the key is the same in a
    chapter's kernel, a pool worker and ``mlic teachers``. A file counts by its syntax tree without docstrings
    (:func:`_code_digest`): editing a docstring, a comment or the layout retrains nothing. The tree's dump can
    differ between Python versions, so a new Python retrains once.

    A ``RuntimeError`` when a module of the closure that this process has imported changed on disk since
    (:func:`_refuse_changed_loaded_code`): its key would not describe the code that runs.
    """
    files = static_import_closure(roots)
    _refuse_changed_loaded_code(files)
    h = hashlib.sha256()
    for f in sorted(files):
        if f.suffix == ".py" and f.is_file():
            st = f.stat()
            h.update(str(f.relative_to(_PACKAGE_DIR)).encode())
            h.update(_code_digest(f, st.st_mtime_ns, st.st_size))
    return h.hexdigest()


def config_hash(config: Mapping[str, Any], length: int = 16, code: Iterable[str] = ()) -> str:
    """Stable hash of a JSON-able config together with the library version and source digest
    (:func:`library_digest` of ``code``)."""
    from mlic_lib import __version__

    payload = json.dumps(
        {"config": _jsonable(config), "version": __version__, "source": library_digest(code)}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:length]
