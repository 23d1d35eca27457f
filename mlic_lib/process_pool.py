"""Independent CPU training runs in a spawn-based process pool.

A small network (INDeeD's simple CNN, CPSD's teachers on a many-core machine) keeps only part of a CPU
busy with intra-op threads: on 2 cores, two one-thread processes train INDeeD's 42x42 CNN about 1.6x
faster than one two-thread process. :func:`map_in_processes` runs ``fn(*args)`` for each task in
``workers`` spawned processes with ``cpus // workers`` torch threads each; :func:`run_missing` gives every run the
threads of a pool over all its jobs, however many of them are missing.

The tasks are meant to write their results to the run cache (``engine.fit`` with a ``run_dir``), so a
pool and a sequential loop end with the same files and the caller loads them the same way. A run's
numbers depend on the torch thread count (the order of floating-point reductions), as they already do
between machines; the seeds still make every run repeatable on the same machine and mode.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["PARALLEL_MODES", "available_cpus", "check_parallel", "discard_kept_pool", "map_in_processes", "pool_size",
           "resolve_parallel", "run_missing"]

#: Values of a profile's ``parallel`` option for independent runs (see :func:`resolve_parallel`).
PARALLEL_MODES = ("auto", "sequential", "process")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def pool_size(n_tasks: int, max_workers: int | None = None) -> int:
    """Worker processes :func:`map_in_processes` starts for ``n_tasks``: one per available CPU (or
    ``max_workers``), never more than the tasks, at least 1."""
    return max(1, min(n_tasks, max_workers or available_cpus()))


def check_parallel(mode: Any, option: str = "parallel") -> None:
    """``ValueError`` naming ``option`` unless ``mode`` is one of :data:`PARALLEL_MODES` (or null = auto)."""
    if mode is not None and mode not in PARALLEL_MODES:
        raise ValueError(f"{option} must be one of {PARALLEL_MODES}, got {mode!r}")


def resolve_parallel(mode: str | None, device: str | None = "auto", option: str = "parallel") -> str:
    """``'process'`` or ``'sequential'`` for a profile's ``parallel`` option (``None`` = ``'auto'``).

    ``'auto'`` picks a process pool on a multi-core CPU and runs sequentially on a GPU (one device,
    one process) or under ``torchrun`` (the ranks already share the work). ``option`` names the
    profile key in the error message."""
    from mlic_lib.utils import pick_device

    check_parallel(mode, option)
    mode = mode or "auto"
    if mode == "auto":
        on_cpu = pick_device(device).type == "cpu"
        alone = int(os.environ.get("WORLD_SIZE", "1")) == 1
        mode = "process" if on_cpu and alone and available_cpus() > 1 else "sequential"
    return mode


_BROKEN_POOL_HELP = (
    "a worker process of the training pool died before finishing its task. Run from a script, the usual cause is "
    "a missing `if __name__ == \"__main__\":` guard around the code that starts the runs (the pool spawns fresh "
    "interpreters, which re-import the script; see the 'safe importing of main module' note of Python's "
    "multiprocessing docs); otherwise a worker ran out of memory. Fix the script, or train in this process with the "
    "profile option parallel: sequential (e.g. -o indeed.parallel=sequential).")


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: end this worker once the process that started the pool is gone.

    A pool stops its workers when it raises or is interrupted (:func:`_stop`), but a process killed outright (the
    out-of-memory killer, ``kill -9``, a closed terminal) runs no clean-up: its spawned workers would go on training,
    then wait on the dead pool's pipe for ever, holding the cores and memory a rerun needs. A daemon thread checks
    once a second that the worker's parent is still ``parent``. The worker ignores SIGINT: an interrupt (a notebook's
    "interrupt kernel", Ctrl-C) reaches the whole process group, and the parent stops the pool itself (:func:`_stop`);
    an idle worker would otherwise print its own KeyboardInterrupt traceback into the cell."""
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="mlic-exit-with-parent", daemon=True).start()


def _call_with_threads(threads: int, fn: Callable, args: Sequence[Any]) -> Any:
    torch.set_num_threads(max(1, threads))
    return fn(*args)


def _stop(pool) -> None:
    """Stop ``pool`` now: cancel the queued tasks and terminate the workers, running tasks included (their runs
    resume from their last checkpoint next time). ``shutdown`` alone waits for every task already handed to a
    worker's queue, which can be all of them."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    if hasattr(pool, "terminate_workers"):  # Python >= 3.14
        pool.terminate_workers()
    else:
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.join(timeout=10)


#: The pool of the last :func:`map_in_processes` call, ``(key, pool)``, kept for the next call with the same size:
#: a chapter that trains in several pools (INDeeD's Table 1, lambda swap and ablation; CPSD's teachers and three sets
#: of students) pays a worker's start-up (interpreter, torch, the library and its source digest: about 3.5 s) once.
#: A worker already trains many tasks one after another (each seeds itself), so a kept one changes no number.
_KEPT: tuple[tuple, Any] | None = None
#: Seconds a kept pool waits idle for the next call before its workers exit: each holds a few hundred MB (torch, the
#: data its tasks read), which an interactive kernel would otherwise hold until it ends.
KEEP_IDLE_S = 120.0
_KEPT_LOCK = threading.RLock()
_IDLE_GEN = 0  # a call's number: an idle timer ends the pool only if no call came after it


def _expire(gen: int) -> None:
    with _KEPT_LOCK:
        if gen == _IDLE_GEN:
            discard_kept_pool()


def _release_later() -> None:
    """Discard the kept pool after :data:`KEEP_IDLE_S` seconds unless another call takes it first."""
    with _KEPT_LOCK:
        timer = threading.Timer(KEEP_IDLE_S, _expire, (_IDLE_GEN,))
    timer.daemon = True
    timer.start()


def _kept_pool(workers: int):
    """The kept pool of ``workers`` processes started by this process, or a new one (the old one shut down)."""
    import atexit
    import multiprocessing as mp
    import sys
    from concurrent.futures import ProcessPoolExecutor

    global _KEPT
    # what a spawned worker takes from this process when it starts: a changed MLIC_CACHE, sys.path or folder starts
    # a new pool (a kept worker would write its runs where the old value says)
    key = (os.getpid(), workers, tuple(sorted(os.environ.items())), tuple(sys.path), os.getcwd())
    if _KEPT is not None and _KEPT[0] == key and not getattr(_KEPT[1], "_broken", False):
        return _KEPT[1]
    discard_kept_pool()
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_exit_with_parent,
                               initargs=(os.getpid(),))
    if _KEPT is None:
        atexit.register(discard_kept_pool)
    _KEPT = (key, pool)
    return pool


def discard_kept_pool() -> None:
    """Shut down the pool :func:`map_in_processes` keeps between calls (its workers exit; the next call starts one)."""
    global _KEPT
    with _KEPT_LOCK:
        kept, _KEPT = _KEPT, None
    if kept is not None and kept[0][0] == os.getpid():
        kept[1].shutdown(wait=True)


def map_in_processes(fn: Callable, tasks: Iterable[Sequence[Any]], *, max_workers: int | None = None,
                     desc: str | None = None, threads: int | None = None) -> list[Any]:
    """``[fn(*args) for args in tasks]``, computed in a spawn-based ``ProcessPoolExecutor``.

    ``fn`` must be a module-level function (spawned workers import it) and ``args`` picklable.
    ``max_workers`` (default: one per available CPU) is capped by the number of tasks; each worker
    uses ``threads`` torch threads (default ``available_cpus() // workers``). ``desc`` shows a progress bar over
    finished tasks. The first exception raised by a task is re-raised here, and an interrupt (a notebook's "interrupt
    kernel", Ctrl-C) stops the pool too: in both cases the workers are terminated at once, the tasks still
    running included, instead of training every remaining run first. A worker whose parent dies without that
    clean-up (killed outright) ends within a second or so.

    The pool is kept for the next call with the same worker count and environment (each worker's start costs
    seconds): its idle workers exit after :data:`KEEP_IDLE_S` seconds without a call, when this process exits, or
    when :func:`discard_kept_pool` ends them.
    """
    global _KEPT, _IDLE_GEN
    from concurrent.futures import FIRST_EXCEPTION, wait
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    from mlic_lib.utils import bar_disabled

    tasks = [tuple(t) for t in tasks]
    if not tasks:
        return []
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"max_workers must be >= 1 (or None for one per CPU), got {max_workers}")
    workers = pool_size(len(tasks), max_workers)
    threads = max(1, available_cpus() // workers if threads is None else int(threads))
    with _KEPT_LOCK:
        _IDLE_GEN += 1  # no idle timer ends the pool from here on
        pool = _kept_pool(workers)
    try:
        with tqdm(total=len(tasks), desc=desc, disable=bar_disabled(desc is not None), leave=False) as bar:
            futures = [pool.submit(_call_with_threads, threads, fn, args) for args in tasks]
            for f in futures:
                f.add_done_callback(lambda _: bar.update(1))
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            exc = failed[0].exception()
            if isinstance(exc, BrokenProcessPool):
                raise RuntimeError(_BROKEN_POOL_HELP) from exc
            raise exc
        results = [f.result() for f in futures]
    except BaseException:
        _KEPT = None  # a stopped pool is not kept
        _stop(pool)
        raise
    _release_later()
    return results  # the pool is kept for the next call (discard_kept_pool or KEEP_IDLE_S idle seconds end it)


def run_missing(fn: Callable, jobs: Mapping[Hashable, Sequence[Any]], done: Callable[[Hashable], bool], *,
                max_workers: int | None = None, desc: str | None = None) -> dict[Hashable, Any]:
    """:func:`map_in_processes` over the ``jobs`` (``{key: args}``) for which ``done(key)`` is false;
    returns ``{key: fn(*args)}`` for those (in this library ``(run folder, cached)``: the caller loads the
    folder each worker wrote and reports the run as cached only if the worker found it so). A single missing job
    runs in this process: a pool of one worker would only add its start-up.

    Every run gets the torch threads a pool over *all* the jobs gives its workers (``available_cpus() //
    pool_size(len(jobs))``), however many are missing: a run's numbers depend on its thread count, so a rerun that
    finds all runs but one cached trains that one as the first call would have."""
    todo = [k for k in jobs if not done(k)]
    threads = max(1, available_cpus() // pool_size(len(jobs), max_workers))
    if len(todo) == 1:
        before = torch.get_num_threads()
        try:
            return {todo[0]: _call_with_threads(threads, fn, jobs[todo[0]])}
        finally:
            torch.set_num_threads(before)
    out = map_in_processes(fn, [jobs[k] for k in todo], max_workers=max_workers, desc=desc, threads=threads)
    return dict(zip(todo, out, strict=True))
