"""The spawn-based process pool used for independent CPU runs (SpliceMix, INDeeD, CPSD)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mlic_lib.process_pool import available_cpus, map_in_processes


def test_results_come_back_in_task_order():
    assert map_in_processes(pow, [(2, 10), (3, 2), (5, 1)], max_workers=2) == [1024, 9, 5]
    assert map_in_processes(pow, []) == []


def test_workers_share_the_cpus_between_their_threads():
    threads = map_in_processes(torch.get_num_threads, [(), ()], max_workers=2)
    assert threads == [max(1, available_cpus() // 2)] * 2


def test_a_run_gets_the_threads_of_a_pool_over_all_jobs_however_many_are_missing(monkeypatch):
    """A run's numbers depend on its thread count: a rerun that found all runs but one cached trained that one in
    this process with its own threads (other numbers than the pool's); the pool's threads followed the missing count."""
    from mlic_lib import process_pool

    monkeypatch.setattr(process_pool, "available_cpus", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        jobs = {"a": (), "b": ()}  # a pool over both: 2 workers of 4 // 2 = 2 threads each
        assert process_pool.run_missing(torch.get_num_threads, jobs, done=lambda k: k == "a") == {"b": 2}
        assert torch.get_num_threads() == 3  # this process's own count is restored
        assert process_pool.run_missing(torch.get_num_threads, {**jobs, "c": (), "d": ()}, done=lambda k: k in "ab",
                                        max_workers=4) == {"c": 1, "d": 1}  # 4 jobs: 4 // 4, not 4 // 2
    finally:
        torch.set_num_threads(before)


def test_a_failing_task_raises_its_own_error():
    with pytest.raises(ValueError, match="invalid literal"):
        map_in_processes(int, [("12",), ("twelve",)], max_workers=2)


def test_workers_leave_an_interrupt_to_the_parent():
    """A notebook's "interrupt kernel" (and Ctrl-C in a terminal) signals the whole process group: an idle worker
    printed its own KeyboardInterrupt traceback into the cell. Workers ignore SIGINT; the parent stops them."""
    import signal

    assert map_in_processes(signal.getsignal, [(signal.SIGINT,)] * 2, max_workers=2) == [signal.SIG_IGN] * 2


def test_the_pool_is_kept_between_calls_and_restarted_when_the_environment_changes(monkeypatch):
    """A chapter that trains in several pools pays a worker's start-up (about 3.5 s) once; a changed MLIC_CACHE
    (which a worker reads) starts a new pool, and discard_kept_pool ends it."""
    from mlic_lib import process_pool

    first = map_in_processes(os.getpid, [(), ()], max_workers=2)
    second = map_in_processes(os.getpid, [(), ()], max_workers=2)  # which worker takes which task varies: sets
    assert set(first) | set(second) <= set(process_pool._KEPT[1]._processes) and os.getpid() not in first
    monkeypatch.setenv("MLIC_CACHE", os.environ["MLIC_CACHE"] + "-other")
    assert set(map_in_processes(os.getpid, [(), ()], max_workers=2)).isdisjoint(first)
    process_pool.discard_kept_pool()
    assert process_pool._KEPT is None
    with pytest.raises(ValueError, match="invalid literal"):
        map_in_processes(int, [("12",), ("twelve",)], max_workers=2)
    assert process_pool._KEPT is None  # a pool stopped by an error is not kept


def test_an_idle_kept_pool_ends_after_keep_idle_s(monkeypatch):
    """Each kept worker holds a few hundred MB: an interactive kernel does not hold them for its whole life."""
    import time

    from mlic_lib import process_pool

    monkeypatch.setattr(process_pool, "KEEP_IDLE_S", 0.5)
    map_in_processes(os.getpid, [(), ()], max_workers=2)
    workers = list(process_pool._KEPT[1]._processes.values())
    deadline = time.monotonic() + 30
    while process_pool._KEPT is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_pool._KEPT is None
    # shut down by the timer's thread, whose executor reaps them: poll rather than join here (a join racing that
    # reaping can see the child already gone and leave is_alive() true for a moment)
    while any(proc.is_alive() for proc in workers) and time.monotonic() < deadline + 30:
        time.sleep(0.1)
    assert not any(proc.is_alive() for proc in workers)



def test_a_stale_idle_timer_leaves_alone_the_pool_a_later_call_took():
    """The idle timer of an earlier call must not end the pool a later call is using (or kept after it)."""
    from mlic_lib import process_pool

    map_in_processes(os.getpid, [(), ()], max_workers=2)
    earlier = process_pool._IDLE_GEN
    map_in_processes(os.getpid, [(), ()], max_workers=2)
    kept = process_pool._KEPT
    process_pool._expire(earlier)  # the first call's timer fires late
    assert process_pool._KEPT is kept and kept is not None
    process_pool._expire(process_pool._IDLE_GEN)  # the last call's timer ends it
    assert process_pool._KEPT is None


def test_a_kept_pool_is_restarted_for_another_worker_count_folder_or_a_dead_worker(tmp_path, monkeypatch):
    """A kept pool serves a call only with the worker count it asked for and the folder its workers started in; a
    pool whose idle worker died (the out-of-memory killer) is replaced, not handed the next tasks."""
    import signal
    import time

    from mlic_lib import process_pool

    map_in_processes(os.getpid, [(), ()], max_workers=2)
    two = process_pool._KEPT[1]
    map_in_processes(os.getpid, [(), ()], max_workers=1)
    assert process_pool._KEPT[1] is not two and process_pool._KEPT[1]._max_workers == 1
    monkeypatch.chdir(tmp_path)  # a relative path in a task is read from the new folder
    assert map_in_processes(os.getcwd, [(), ()], max_workers=1) == [str(tmp_path)] * 2
    pool = process_pool._KEPT[1]
    for proc in list(pool._processes.values()):
        os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not getattr(pool, "_broken", False) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert map_in_processes(pow, [(2, 3), (3, 2)], max_workers=1) == [8, 9]
    process_pool.discard_kept_pool()


def test_bad_worker_count():
    with pytest.raises(ValueError, match="max_workers must be >= 1"):
        map_in_processes(pow, [(2, 2)], max_workers=0)


def test_run_missing_skips_what_is_done():
    from mlic_lib.process_pool import run_missing

    jobs = {"a": (2, 3), "b": (3, 3), "c": (4, 3)}
    assert run_missing(pow, jobs, lambda k: k == "b", max_workers=2) == {"a": 8, "c": 64}
    assert run_missing(pow, jobs, lambda k: True) == {}
    assert run_missing(os.getpid, {"a": ()}, lambda k: False) == {"a": os.getpid()}  # one missing job: no pool


def _run_script(path, cwd, *args):
    """Run a Python script in its own process group; on a timeout kill the group (spawned workers included)."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, str(path), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out, err


@pytest.mark.slow
def test_unguarded_script_gets_a_clear_error(tmp_path):
    """A script that starts a pool at import time (no ``__main__`` guard) kills its spawned workers; the
    error names the guard and the sequential fallback instead of a bare BrokenProcessPool."""
    script = tmp_path / "unguarded.py"
    script.write_text("from mlic_lib.process_pool import map_in_processes\n"
                      "print(map_in_processes(pow, [(2, 3), (3, 2)], max_workers=2))\n")
    rc, _, err = _run_script(script, tmp_path)
    assert rc != 0
    assert "a worker process of the training pool died" in err and "parallel: sequential" in err
    guarded = tmp_path / "guarded.py"
    guarded.write_text("from mlic_lib.process_pool import map_in_processes\n"
                       "if __name__ == '__main__':\n"
                       "    print(map_in_processes(pow, [(2, 3), (3, 2)], max_workers=2))\n")
    rc, out, _ = _run_script(guarded, tmp_path)
    assert rc == 0 and "[8, 9]" in out


_STOP_SCRIPT = """
import os, signal, sys, threading, time
from pathlib import Path
from mlic_lib.process_pool import map_in_processes

def wait_for(path):
    for _ in range(1200):
        if path.exists():
            return
        time.sleep(0.05)

def task(i, marks):
    Path(marks, f"started-{i}").touch()
    if i == 0:
        wait_for(Path(marks, "started-1"))  # fail while another task is running
        raise ValueError("task 0 failed")
    time.sleep(5.0)
    Path(marks, f"done-{i}").touch()

if __name__ == "__main__":
    marks, how = sys.argv[1], sys.argv[2]
    first = 1 if how == "interrupt" else 0
    if how == "interrupt":  # Ctrl-C (a notebook's "interrupt kernel") while a task runs
        threading.Thread(target=lambda: (wait_for(Path(marks, "started-1")), os.kill(os.getpid(), signal.SIGINT)),
                         daemon=True).start()
    try:
        map_in_processes(task, [(i, marks) for i in range(first, first + 4)], max_workers=2)
    except (ValueError, KeyboardInterrupt) as err:
        print("stopped:", type(err).__name__, err)
    time.sleep(6.0)  # longer than a task: a worker left running would have written its mark by now
    print("done:", sorted(p.name for p in Path(marks).glob("done-*")))
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["failure", "interrupt"])
def test_a_failure_or_an_interrupt_stops_the_running_tasks(tmp_path, how):
    """The first failure (or an interrupt) terminates the workers at once: the task running beside the failed one
    and the queued ones never finish (before, the pool trained every remaining run before raising)."""
    script = tmp_path / "stop.py"
    script.write_text(_STOP_SCRIPT)
    marks = tmp_path / "marks"
    marks.mkdir()
    rc, out, err = _run_script(script, tmp_path, str(marks), how)
    assert rc == 0, err
    expected = "stopped: ValueError task 0 failed" if how == "failure" else "stopped: KeyboardInterrupt"
    assert expected in out
    assert "done: []" in out, out


_ORPHAN_SCRIPT = """
import os, sys, time
from pathlib import Path
from mlic_lib.process_pool import map_in_processes

def task(i, marks):
    Path(marks, f"worker-{i}").write_text(str(os.getpid()))
    time.sleep(60.0)

if __name__ == "__main__":
    map_in_processes(task, [(i, sys.argv[1]) for i in range(2)], max_workers=2)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="kills with SIGKILL")
def test_workers_end_when_the_process_that_started_the_pool_is_killed(tmp_path):
    """A kernel killed by the out-of-memory killer (or ``kill -9``) runs no clean-up: its workers used to go on
    for ever, holding the CPUs and memory a rerun needs."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "orphans.py"
    script.write_text(_ORPHAN_SCRIPT)
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(marks)], cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while len(list(marks.glob("worker-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in marks.glob("worker-*")]
        assert len(pids) == 2, "the workers did not start"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), "a worker outlived the killed process that started the pool"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def alone_on_cpu(monkeypatch):
    """No torchrun, no GPU, four CPUs: the case where 'auto' picks the pool; each test changes one thing."""
    import mlic_lib.process_pool

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mlic_lib.process_pool, "available_cpus", lambda: 4)


@pytest.mark.parametrize("device", ["auto", None, "cpu"])
def test_auto_uses_processes_on_a_multicore_cpu(alone_on_cpu, device):
    from mlic_lib.process_pool import resolve_parallel

    assert resolve_parallel("auto", device) == "process"
    assert resolve_parallel(None, device) == "process"  # None (option left out) means 'auto'


def test_auto_runs_sequentially_on_one_cpu(alone_on_cpu, monkeypatch):
    import mlic_lib.process_pool
    from mlic_lib.process_pool import resolve_parallel

    monkeypatch.setattr(mlic_lib.process_pool, "available_cpus", lambda: 1)
    assert resolve_parallel("auto", "cpu") == "sequential"


def test_auto_runs_sequentially_on_a_gpu(alone_on_cpu, monkeypatch):
    from mlic_lib.process_pool import resolve_parallel

    assert resolve_parallel("auto", "cuda") == "sequential"  # named explicitly
    assert resolve_parallel("auto", "cuda:1") == "sequential"
    assert resolve_parallel("auto", "auto") == "process"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # 'auto' resolves to the GPU
    assert resolve_parallel("auto", "auto") == "sequential"
    assert resolve_parallel("auto", "cpu") == "process"  # a CPU run asked for on a GPU machine still pools


def test_auto_runs_sequentially_under_torchrun(alone_on_cpu, monkeypatch):
    from mlic_lib.process_pool import resolve_parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_parallel("auto", "cpu") == "sequential"
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one rank: the pool is still useful
    assert resolve_parallel("auto", "cpu") == "process"


def test_explicit_modes_are_kept_and_bad_ones_name_the_option(alone_on_cpu, monkeypatch):
    from mlic_lib.process_pool import resolve_parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_parallel("process", "cuda") == "process"  # only 'auto' looks at the device and torchrun
    assert resolve_parallel("sequential", "cpu") == "sequential"
    with pytest.raises(ValueError, match=r"indeed\.parallel must be one of \('auto', 'sequential', 'process'\), "
                                         r"got 'threads'"):
        resolve_parallel("threads", "cpu", option="indeed.parallel")
    with pytest.raises(ValueError, match=r"^parallel must be one of"):
        resolve_parallel("Process")


def test_psd_auto_follows_the_library_rule_and_torchrun(alone_on_cpu, monkeypatch):
    """CPSD's psd.parallel 'auto': torchrun's ranks under torchrun, else the rule above (a pool on a multi-core CPU,
    one run after another on a GPU); an explicit mode is kept, a bad one named."""
    from mlic_lib import psd

    s = {"train": {"device": "auto"}, "psd": {"parallel": "auto"}}
    assert psd.resolve_mode(s) == "process" and psd.resolve_mode({"train": {}}) == "process"
    assert psd.resolve_mode(s, "sequential") == "sequential"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert psd.resolve_mode(s) == "sequential"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert psd.resolve_mode(s) == "torchrun"
    with pytest.raises(ValueError, match="parallel must be one of"):
        psd.resolve_mode({"psd": {"parallel": "threads"}})
