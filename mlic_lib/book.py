"""Execute the chapters with papermill and build the HTML book from the executed copies.

``make book`` calls :func:`build_book`:

1. every ``notebooks/*.ipynb`` is executed by papermill with ``profile=<profile>`` into
   ``_build/executed/notebooks/`` (wall-clock time of each goes to ``_build/executed/timings.json``);
2. a source tree is staged in ``_build/src`` (``_config.yml``, ``_toc.yml``, ``book/``, the executed
   notebooks), so the committed notebooks stay output-free;
3. Jupyter Book 1 builds ``_build/html`` from it with ``execute_notebooks: off`` and warnings as errors.

Chapters write their headline numbers to ``$MLIC_RESULTS`` (``_build/results`` unless it is set). One build runs
on a checkout at a time (a lock in ``_build``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlic_lib.utils import atomic_write_json, env_path


def notebooks(root: Path, only: Sequence[str] | None = None) -> list[Path]:
    """The chapter notebooks in book order (file-name order); ``only`` filters by substring."""
    found = sorted((root / "notebooks").glob("*.ipynb"))
    if only:
        found = [p for p in found if any(o in p.stem for o in only)]
        if not found:
            raise ValueError(f"no notebook matches {list(only)} in {root / 'notebooks'}")
    return found


def execute_notebook(src: Path, dst: Path, profile: str, parameters: dict | None = None,
                     kernel: str = "python3", timeout: int | None = None, progress: bool = False,
                     log_output: bool = False) -> float:
    """Run ``src`` with papermill (``profile`` injected into its ``parameters`` cell) into ``dst``.

    Returns the wall-clock seconds. The working directory is the notebook's folder, as in JupyterLab.
    ``dst`` is replaced only by a complete run: a failing cell raises papermill's error, leaves the last good
    ``dst`` as it was and keeps the partly executed notebook, with the traceback, as :func:`failed_copy` of ``dst``.
    ``progress``: papermill's bar over the cells (on stderr); ``log_output``: the cells' output as they run, on
    stderr.
    """
    import papermill as pm

    dst.parent.mkdir(parents=True, exist_ok=True)
    running, failed = dst.with_name(f"{dst.stem}.running{dst.suffix}"), failed_copy(dst)
    t0 = time.perf_counter()
    try:
        with _kernel_transport() as transport, _cell_output_on_stderr(log_output):
            pm.execute_notebook(  # progress: an explicit disable=False, which wins over the book's TQDM_DISABLE
                str(src), str(running), parameters={"profile": profile, **(parameters or {})}, kernel_name=kernel,
                cwd=str(src.parent), progress_bar={"disable": False} if progress else False, log_output=log_output,
                execution_timeout=timeout, report_mode=False, config=transport,
            )
    except BaseException:
        if running.exists():
            running.replace(failed)
        raise
    running.replace(dst)
    failed.unlink(missing_ok=True)  # a stale failure of an earlier run
    return time.perf_counter() - t0


@contextlib.contextmanager
def _cell_output_on_stderr(enabled: bool):
    """Within the block, show papermill's log of the cells' output (INFO) on stderr, when ``enabled``; the
    logger's handlers and level are as before afterwards."""
    import logging

    if not enabled:
        yield
        return
    logger = logging.getLogger("papermill")
    handler, level = logging.StreamHandler(sys.stderr), logger.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def _kernel_transport():
    """The ``KernelManager`` configuration for one kernel, with its socket folder removed afterwards.

    The kernel talks over Unix sockets where there are some (no TCP ports on localhost, no "TCP without encryption"
    warning from ipykernel), in a private folder: by default jupyter_client would make them in the working directory
    (notebooks/), where a killed run leaves them and two runs may take each other's. A socket path is limited to
    ``zmq.IPC_PATH_MAX_LEN`` characters (107 on Linux): under a long ``$TMPDIR`` the folder is made in ``/tmp``
    instead, and where that is too long as well (or on Windows) the kernel keeps jupyter_client's TCP default.
    """
    from traitlets.config import Config

    ipc_dir = None
    if os.name == "posix":
        import zmq

        limit = getattr(zmq, "IPC_PATH_MAX_LEN", 0) or 107
        for parent in (None, "/tmp"):  # $TMPDIR, then /tmp
            folder = tempfile.mkdtemp(prefix="mlic-kernel-", dir=parent)
            if len(os.path.join(folder, "kernel-99999")) <= limit:
                ipc_dir = folder
                break
            os.rmdir(folder)
    try:
        yield Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(ipc_dir, "kernel")}}) if ipc_dir \
            else Config()
    finally:
        if ipc_dir is not None:
            shutil.rmtree(ipc_dir, ignore_errors=True)


def run_chapter(nb: Path, dst: Path, profile: str, parameters: dict | None = None, **options) -> float:
    """:func:`execute_notebook` of chapter ``nb`` into ``dst``, with any failure turned into
    :func:`execution_failure`'s error naming the chapter, the cell where there is one, and the partly executed copy.
    ``mlic book`` and ``mlic reproduce`` run their chapters through it. Another run executing into the same ``dst``
    at the time (two ``mlic reproduce`` of one chapter and profile) is an error: they would share ``.running`` and
    ``.failed`` copies."""
    import zmq
    from papermill.exceptions import PapermillExecutionError

    from mlic_lib.file_lock import exclusive

    dst.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(dst.with_name(f".{dst.name}.lock"), f"another run is executing {nb.name} into {dst}: wait for it "
                                                      "to finish, or give this one another --out"):
        try:
            return execute_notebook(nb, dst, profile, parameters, **options)
        except PapermillExecutionError as err:  # a failing cell: its error holds the traceback, not chained again
            raise execution_failure(nb, dst, err) from None
        except (RuntimeError, TimeoutError, zmq.ZMQError) as err:  # a kernel that died, never started, or timed out
            raise execution_failure(nb, dst, err) from err


def chapter_of(nb: Path) -> str | None:
    """The chapter (profile file name) whose name is in notebook ``nb``'s file name, ``None`` if none is."""
    from mlic_lib.profiles import chapters

    return next((c for c in chapters() if c in nb.stem), None)


def failed_copy(dst: Path) -> Path:
    """Where :func:`execute_notebook` keeps the partly executed notebook of a failed run of ``dst``."""
    return dst.with_name(f"{dst.stem}.failed{dst.suffix}")


def execution_failure(nb: Path, dst: Path, err: Exception) -> RuntimeError:
    """The error for a chapter ``nb`` whose run into ``dst`` failed with ``err``: for a failing cell (papermill's
    error) the cell and its error, otherwise (a kernel that died, out of memory say, or could not start) the error;
    then where the partly executed notebook and the last complete run are."""
    from papermill.exceptions import PapermillExecutionError

    failed = failed_copy(dst)
    if isinstance(err, PapermillExecutionError):
        what = (f"{nb.name} failed in cell {err.exec_count} with {err.ename}: {err.evalue}\n  the partly executed "
                f"notebook, with the full traceback, is {failed}")
    else:
        from nbclient.exceptions import DeadKernelError

        hint = " (a kernel that dies was often killed for lack of memory)" if isinstance(err, DeadKernelError) else ""
        what = (f"{nb.name}: the run stopped with {type(err).__name__}: {err}{hint}"
                + (f"\n  the partly executed notebook is {failed}" if failed.exists() else ""))
    return RuntimeError(what + (f"\n  (the last complete run stays in {dst})" if dst.exists() else ""))


def check_device(profile: str, allow_cpu: bool = False) -> None:
    """``ValueError`` for a ``full`` run on a machine without a CUDA GPU, unless ``allow_cpu``: the papers' recipes
    take hours on a GPU and days on a CPU, which a one-line note scrolling away did not make clear."""
    if profile != "full" or allow_cpu:
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError("profile full runs the papers' recipes (hours on a GPU, days on a CPU) and this machine has "
                         "no CUDA GPU: run it on one, or pass --allow-cpu to run it here anyway (e.g. shrunk with "
                         "-o overrides)")


def preflight(chapter: str, profile: str, settings: Mapping[str, Any] | None = None,
              run_dir: str | os.PathLike | None = None) -> list[str]:
    """Notes on what a run of ``chapter`` with ``profile`` will lack, printed before it starts (a ``full`` run
    finds a missing dataset only at the cell that reads it, possibly hours in): each real dataset the settings
    name (``dataset`` / ``source`` keys, with the datasets those need) that ``mlic data check`` does not report
    present under the section's ``root`` (default ``$MLIC_DATA``), and, for ``full``, the absence of a CUDA GPU.
    A relative ``root`` is resolved against ``run_dir``, the folder the chapter's kernel runs in (the repository's
    ``notebooks/``), as the chapter resolves it; default: the current folder. Empty when nothing is missing."""
    from mlic_lib.data.download import status
    from mlic_lib.data.paths import data_root
    from mlic_lib.data.registry import DATASETS
    from mlic_lib.profiles import _flatten, load_profile

    settings = load_profile(chapter, profile) if settings is None else settings
    flat = _flatten(settings)
    needed: dict[str, Path] = {}  # dataset -> the folder it is read from (a section's root, else $MLIC_DATA)
    for key, value in flat.items():
        if key.rsplit(".", 1)[-1] in ("dataset", "source") and isinstance(value, str) and value in DATASETS:
            own = flat.get(f"{key.rsplit('.', 1)[0]}.root") if "." in key else settings.get("root")
            root = Path(own).expanduser() if own else data_root()
            if own and run_dir is not None and not root.is_absolute():
                root = Path(run_dir) / root
            for name in (value, *DATASETS[value].needs):  # VOC-LT reads VOC2012's and VOC2007's images
                needed.setdefault(name, root)
    notes = []
    for name, root in sorted(needed.items()):
        state = status(DATASETS[name], root)
        if not state.startswith("present"):
            notes.append(f"{name} is {state} under {root}: the chapter's {name} parts will fail or be skipped; "
                         f"run `mlic data prepare {name}` first (or `mlic data fake {name} --data-dir DIR` and "
                         "MLIC_DATA=DIR for a dry run)")
    if profile == "full":
        import torch

        if not torch.cuda.is_available():
            notes.append("no CUDA GPU: the full profile is a paper's recipe, hours on a GPU and far longer on a CPU")
    return notes


def env_defaults(build: Path) -> None:
    """Prepare the environment the chapters' kernels inherit: ``$MLIC_RESULTS`` and ``$MLIC_CACHE`` default to
    ``build/results`` and ``build/cache``, the ``MLIC_*`` folders become absolute (the kernels run in
    ``notebooks/``), progress bars are off unless ``TQDM_DISABLE`` says otherwise, and :func:`check_folders` runs."""
    for name, sub in (("MLIC_RESULTS", "results"), ("MLIC_CACHE", "cache")):
        if not os.environ.get(name):  # unset or empty
            os.environ[name] = str((build / sub).resolve())
    for name in ("MLIC_RESULTS", "MLIC_CACHE", "MLIC_DATA", "MLIC_REFERENCE_DATA"):
        # the kernels run in notebooks/: a relative path given here means one under this working directory
        if os.environ.get(name):
            os.environ[name] = str(Path(os.environ[name]).expanduser().resolve())
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars help in JupyterLab, not in the HTML book
    check_folders()


def _writable(folder: Path) -> str | None:
    """Why ``folder`` cannot be written (created if missing), or ``None`` when it can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        return "it is a file, not a folder"
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def check_folders() -> None:
    """Check the folders the chapters write to and read from before a kernel starts, naming the variable: a
    ``$MLIC_RESULTS`` that cannot be written (the chapters write their results there in their last cell, after all
    the training), a ``$MLIC_CACHE`` or ``$MLIC_DATA`` that is a file are a ``ValueError``. A cache that cannot be
    written is a note on stderr: the runs already in it load (a shared, read-only cache), any other fails when saved."""
    from mlic_lib.data.paths import data_root

    results = os.environ.get("MLIC_RESULTS")
    problem = _writable(Path(results)) if results else None
    if problem:
        raise ValueError(f"MLIC_RESULTS={results} cannot be written ({problem}): the chapters save their results "
                         "there; set MLIC_RESULTS to a folder you can write, or unset it for the default")
    cache = os.environ.get("MLIC_CACHE")
    if cache and Path(cache).exists() and not Path(cache).is_dir():
        raise ValueError(f"MLIC_CACHE={cache} is a file, not a folder: set MLIC_CACHE to a folder (the run cache), "
                         "or unset it for the default")
    problem = _writable(Path(cache)) if cache else None
    if problem:
        print(f"note: MLIC_CACHE={cache} cannot be written ({problem}): the runs already in it load, any other fails "
              "when it is saved", file=sys.stderr, flush=True)
    data_root()  # a file there is an error naming MLIC_DATA


def stage_sources(root: Path, build: Path, executed: Path) -> Path:
    """Copy the book's sources and the executed notebooks into ``build/src`` and return it."""
    src = build / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, src / name)
    shutil.copytree(root / "book", src / "book")
    shutil.copytree(executed / "notebooks", src / "notebooks",  # ".*": run_chapter's lock files
                    ignore=shutil.ignore_patterns("*.failed.ipynb", "*.running.ipynb", ".*"))
    for nb in (src / "notebooks").glob("*.ipynb"):
        _hide_default_parameters(nb)
    results = env_path("MLIC_RESULTS", build / "results")
    (src / "book" / "reproduction.md").write_text(reproduction_page(results, root / "book" / "published.yaml"))
    return src


def _assignments(source: str) -> dict[str, Any] | None:
    """The ``name = literal`` assignments of a parameters cell, or ``None`` if it holds anything else."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    out: dict[str, Any] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            return None
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            return None
    return out


def _hide_default_parameters(path: Path) -> None:
    """In the book's copy, show one parameters cell where papermill injected the values used: the notebook's own
    cell (with every parameter and its comments, e.g. ``overrides``, which papermill injects only when given) when
    the injected values are its defaults, else the injected cell, headed by the notebook's own cell as a comment so
    the reader still sees every parameter."""
    import json

    nb = json.loads(path.read_text())
    cells = nb["cells"]
    tags = [c.get("metadata", {}).get("tags", []) for c in cells]
    injected = [c for c, t in zip(cells, tags, strict=True) if "injected-parameters" in t]
    own = [c for c, t in zip(cells, tags, strict=True) if "parameters" in t and "remove-cell" not in t]
    if not injected:
        return

    def text(cell: dict) -> str:
        return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]

    def hide(cell: dict) -> None:
        cell.setdefault("metadata", {})["tags"] = [*cell["metadata"].get("tags", []), "remove-cell"]

    defaults = _assignments(text(own[0])) if len(own) == 1 else None
    given = _assignments(text(injected[0])) if len(injected) == 1 else None
    if defaults is not None and given is not None and all(k in defaults and defaults[k] == v for k, v in given.items()):
        for cell in injected:
            hide(cell)
    else:
        for cell in own:
            hide(cell)
        if len(own) == 1 and len(injected) == 1:
            head = "".join(f"# {line}\n" if line else "#\n" for line in text(own[0]).splitlines())
            injected[0]["source"] = (f"# The notebook's parameters:\n{head}# The values this build ran with:\n"
                                     + text(injected[0]).replace("# Parameters\n", "", 1))
    path.write_text(json.dumps(nb, indent=1))


#: Factor that takes a number stored in the results JSON's unit (first) to a matrix row's unit (second).
_CONVERT = {("fraction", "%"): 100.0, ("fraction", "points"): 100.0}


def row_scale(stored: str | None, shown: str) -> float:
    """Factor from a results JSON's unit ``stored`` (:data:`mlic_lib.reporting.UNITS`) to a matrix row's ``shown``
    unit: 1 for the same unit, 100 from a fraction to % or points, 1 from a dimensionless ``"1"`` to a row unit
    that is not one of the units (a named index such as ``ARI``). ``ValueError`` for any other pair, e.g. a
    row in % of a number stored in seconds, or a key the JSON gives no unit."""
    from mlic_lib.reporting import UNITS

    if stored == shown:
        return 1.0
    if (stored, shown) in _CONVERT:
        return _CONVERT[stored, shown]
    if stored == "1" and shown not in UNITS:
        return 1.0
    raise ValueError(f"a number stored in unit {stored!r} cannot be shown in unit {shown!r}")


def _scale(key: str, units: Mapping[str, str], shown: str) -> float | None:
    """:func:`row_scale` of ``key``'s stored unit to the row unit ``shown``, or None where the two do not fit."""
    from mlic_lib.reporting import unit_of

    try:
        return row_scale(unit_of(key, units), shown)
    except ValueError:
        return None


def _fmt(x: float, unit: str) -> str:
    """Two decimals for percentages, points (the papers' precision) and adjusted Rand indices (as the chapter
    prints them), four significant digits otherwise."""
    return f"{x:.2f}" if unit in ("%", "points", "ARI") else f"{x:.4g}"


def reproduction_page(results: Path, published: Path) -> str:
    """Markdown of the reproduction matrix: the headline rows that ``book/published.yaml`` lists per chapter
    (``label``, ``key``, ``unit``, ``std``, ``published``), ours from this build's results JSONs (converted from
    the unit the JSON declares for the key to the row's unit by :func:`row_scale`, with the spread over seeds
    where the chapter wrote one) next to the papers' values. A row whose unit does not fit the stored one says
    so in its cell instead of showing a number on the wrong scale."""
    import json
    import math

    import yaml

    from mlic_lib.reporting import flatten_numbers, unit_of

    pub = yaml.safe_load(published.read_text()) if published.is_file() else {}
    lines = [
        "# Reproduction matrix",
        "",
        "Every value in the *ours* column was computed by the chapter's executed copy shown in this book (its",
        "profile and the time it was written are under each heading); the profile says at what scale.",
        "Under the `default` profile the data is the book's embedded data, not the paper's",
        "dataset, so compare directions (which method wins, by how much relative to the spread), not",
        "absolute values. Both columns are in the row's unit; *± x* is the standard deviation over the",
        "chapter's seeds where it ran more than one, except on a row of a difference whose label says its ± is",
        "the seed spread of the difference. Published values are quoted from the papers (table",
        "given per chapter). Each chapter writes more numbers than these headline rows to",
        "`_build/results/<chapter>.json`, whose `units` field gives the unit of every number in it.",
        "",
    ]
    order = {name: i for i, name in enumerate(pub)}  # book order, as listed in published.yaml
    files = sorted(results.glob("*.json"), key=lambda f: (order.get(f.stem, len(order)), f.stem)) \
        if results.is_dir() else []
    if not files:
        lines.append("No chapter has written results in this build.")
    for f in files:
        try:
            res = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            res = e
        if not isinstance(res, dict) or not isinstance(res.get("numbers"), dict):  # not a chapter's results
            lines += [f"`{f.name}` in the results folder is not a chapter's results file: skipped.", ""]
            continue
        chapter = res.get("chapter", f.stem)
        info = pub.get(chapter, {})
        flat = dict(flatten_numbers(res.get("numbers", {})))  # dotted key -> number, once per chapter
        units = dict(res.get("units") or [])  # [pattern, unit] pairs, in order
        lines += [f"## {info.get('paper', chapter)}", "",
                  f"Profile `{res.get('profile')}`, written {res.get('written', '?')}, "
                  f"mlic_lib {res.get('library_version', '?')}.", ""]
        if info.get("source"):
            lines += [f"Published: {info['source']}.", ""]
        rows = info.get("rows", [])
        if not rows:
            lines += ["No headline rows are listed for this chapter in `book/published.yaml`.", ""]
            continue
        lines += ["| quantity | unit | ours | published |", "|---|---|---|---|"]
        for row in rows:
            unit = row.get("unit", "")
            value, std = flat.get(row["key"]), flat.get(row.get("std"))
            scale = {k: _scale(k, units, unit) for k in (row["key"], row.get("std")) if k in flat}
            misfit = [k for k, f in scale.items() if f is None]
            if value is None:  # an optional row needs reference files or settings this build did not have
                ours = ("not computed in this build" + (f" ({row['needs']})" if row.get("needs") else "")
                        if row.get("optional") else "not computed in this build")
            elif not units:
                ours = "the results file declares no units (written by an older mlic_lib): rerun the chapter"
            elif misfit:
                ours = f"{misfit[0]} is stored in unit {unit_of(misfit[0], units)!r}, not {unit!r}"
            elif not math.isfinite(value):  # e.g. the primer's CAM share when every map is all zero
                ours = "no value in this build (the chapter wrote NaN)" if value != value else f"{value} (not finite)"
            else:
                ours = _fmt(scale[row["key"]] * value, unit)
                if std is not None and math.isfinite(std):  # NaN (one seed) shows no spread
                    ours += f" ± {_fmt(scale[row['std']] * std, unit)}"
                caveat = row.get("caveat") or {}  # {key, text}: a count the chapter flags, e.g. runs on a plateau
                n_flagged = flat.get(caveat.get("key"))
                if isinstance(n_flagged, int | float) and n_flagged > 0:
                    ours += f" ({n_flagged:g} {caveat.get('text', 'flagged in the chapter')})"
            paper = row.get("published")
            lines.append(f"| {row['label']} | {row.get('unit', '')} | {ours} | {'-' if paper is None else paper} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def build_html(src: Path, out_root: Path, strict: bool = True) -> Path:
    """``jupyter-book build`` of ``src``; the HTML lands in ``out_root/_build/html``."""
    exe = Path(sys.executable).with_name("jupyter-book")
    if not exe.is_file():
        found = shutil.which("jupyter-book")
        if found is None:
            raise RuntimeError("jupyter-book is not installed in this environment; run `make book` (it sets up .venv)")
        exe = Path(found)
    cmd = [str(exe), "build", str(src), "--path-output", str(out_root), "--keep-going"]
    if strict:
        cmd += ["-W", "-n"]
    done = subprocess.run(cmd)
    if done.returncode:
        raise RuntimeError(f"jupyter-book build failed (exit status {done.returncode}); its messages are above"
                           + (" (with strict, every Sphinx warning is an error: a broken reference or a missing page "
                              "fails the build)" if strict else ""))
    return out_root / "_build" / "html"


def executed_profiles(folder: Path) -> dict[str, str | None]:
    """``{notebook name: the profile papermill ran it with}`` for the executed copies in ``folder`` (``None`` where a
    copy does not say)."""
    import json

    found = {}
    for nb in sorted(folder.glob("*.ipynb")):
        if nb.name.endswith((".failed.ipynb", ".running.ipynb")):
            continue
        try:
            meta = json.loads(nb.read_text()).get("metadata", {})
        except ValueError:
            meta = {}
        found[nb.name] = ((meta.get("papermill") or {}).get("parameters") or {}).get("profile")
    return found


def _record_timings(path: Path, profile: str, timings: dict[str, float]) -> None:
    """Write the chapters' execution seconds to ``path``: merged with those already there when they are of the same
    profile (a partial build, ``--only``, updates its chapters), replacing them otherwise."""
    import json

    seconds = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            seconds = dict(old.get("seconds", {})) if old.get("profile") == profile else {}
        except (ValueError, AttributeError):
            seconds = {}
    seconds.update(timings)
    atomic_write_json({"profile": profile, "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1)},
                      path)


def build_book(root: str | Path = ".", profile: str = "default", only: Sequence[str] | None = None,
               strict: bool = True, skip_execute: bool = False, allow_cpu: bool = False) -> Path:
    """Execute the chapters with ``profile`` (those matching ``only``; none with ``skip_execute``) and build the
    HTML book from the executed copies; returns the ``index.html`` path.

    A chapter not executed in this build is shown from its last executed copy; a copy run with another profile than
    ``profile`` is named in a note. ``profile="full"`` on a machine without a CUDA GPU is refused unless
    ``allow_cpu`` (:func:`check_device`). Another build of the same checkout running at the time is an error.
    """
    from mlic_lib.file_lock import exclusive

    root = Path(root).resolve()
    build = root / "_build"
    executed = build / "executed"
    if not skip_execute:
        check_device(profile, allow_cpu)
    env_defaults(build)
    with exclusive(build / ".lock", f"another `mlic book` is building {build}: wait for it to finish (one build "
                                    "per checkout at a time)"):
        if not skip_execute:
            timings: dict[str, float] = {}
            for nb in notebooks(root, only):
                chapter = chapter_of(nb)
                for note in preflight(chapter, profile, run_dir=root / "notebooks") if chapter else []:
                    print(f"[book] note: {note}", flush=True)
                print(f"[book] executing {nb.name} (profile={profile}) ...", flush=True)
                seconds = run_chapter(nb, executed / "notebooks" / nb.name, profile)
                timings[nb.stem] = round(seconds, 1)
                print(f"[book] {nb.name} done in {seconds:.1f} s", flush=True)
            _record_timings(executed / "timings.json", profile, timings)
        elif not (executed / "notebooks").is_dir():
            raise ValueError(f"no executed chapters in {executed / 'notebooks'}: run `mlic book` (or `make book`) once "
                             "without --skip-execute (`mlic reproduce` keeps its copies apart, in "
                             "_build/executed/<profile>/)")
        other = {nb: p for nb, p in executed_profiles(executed / "notebooks").items() if p != profile}
        if other:
            print(f"[book] note: shown as last executed, with another profile than {profile}: "
                  + ", ".join(f"{nb} ({p or 'profile unknown'})" for nb, p in other.items()), flush=True)
        src = stage_sources(root, build, executed)
        html = build_html(src, root, strict=strict)
    index = html / "index.html"
    if not index.is_file():
        raise RuntimeError(f"jupyter-book finished but {index} is missing")
    print(f"[book] built {index}", flush=True)
    return index
