"""The ``mlic`` command.

::

    mlic book [--profile default] [--only primer]     execute the chapters and build the HTML book
    mlic reproduce CHAPTER [--profile full] [-o key=value ...] [--out NB] [--log-output]
        execute one chapter into _build/executed/PROFILE/ (or NB; its results JSON into results/ beside it),
        with a progress bar over its cells; trained runs are shared with the book through _build/cache
    mlic profile CHAPTER [--profile smoke] [-o key=value ...]   show a chapter's resolved settings
    mlic teachers [--profile full] [-o key=value ...]   train CPSD's teachers into the cache, e.g. under
        `torchrun --nproc_per_node=8 -m mlic_lib.cli teachers --profile full` (one teacher per GPU at a time),
        before `mlic reproduce psd --profile full` (which then trains only the students)
    mlic data check [--data-dir DIR]                   report which real datasets are present
    mlic data prepare NAME [--allow-unverified] [--force]  download (resumable), verify sha256, unpack
    mlic data fake NAME --data-dir DIR                 write a small synthetic dataset in NAME's real layout

``mlic --root REPO COMMAND`` names the repository (where ``_config.yml`` lives); ``mlic data ... --data-dir DIR``
names a datasets' folder other than ``$MLIC_DATA``. ``data`` refuses the first (it reads no repository).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import yaml

from mlic_lib.profiles import PROFILES, chapters, load_profile, parse_overrides


def _chapter_notebook(root: Path, name: str) -> tuple[str, Path]:
    """The chapter (profile name) and notebook that ``name`` (a chapter or part of a file name) picks."""
    from mlic_lib.book import chapter_of, notebooks

    if not (root / "notebooks").is_dir():
        raise ValueError(f"no notebooks/ folder in {root}: run from the repository root or name it before the command, "
                         "`mlic --root REPO reproduce ...`")
    found = notebooks(root)
    by_chapter = {c: nb for nb in found if (c := chapter_of(nb)) is not None}
    if name in by_chapter:
        return name, by_chapter[name]
    hits = [nb for nb in found if name in nb.stem]
    if len(hits) != 1:
        import difflib

        what = "no chapter" if not hits else f"{len(hits)} chapters ({', '.join(nb.stem for nb in hits)})"
        close = difflib.get_close_matches(name, list(by_chapter), n=1) if not hits else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name!r} matches {what}{hint}; name one of: {', '.join(by_chapter)}")
    chapter = chapter_of(hits[0])
    if chapter is None:
        raise ValueError(f"{hits[0].name} has no profile file in mlic_lib/profiles")
    return chapter, hits[0]


def _cmd_book(args) -> int:
    from mlic_lib.book import build_book

    if not (Path(args.root) / "_config.yml").is_file():
        raise ValueError(f"no book in {Path(args.root).resolve()} (no _config.yml): run from the repository root or "
                         "name it before the command, `mlic --root REPO book ...`")
    strict = not args.no_strict and not args.only
    if args.only and not args.no_strict:
        print("mlic book --only: a partial book, built without --strict (the other chapters are shown as last "
              "executed, if they were)")
    build_book(args.root, args.profile, args.only, strict=strict, skip_execute=args.skip_execute,
               allow_cpu=args.allow_cpu)
    return 0


def _cmd_reproduce(args) -> int:
    from mlic_lib.book import check_device, env_defaults, preflight, run_chapter

    root = Path(args.root).resolve()
    chapter, nb = _chapter_notebook(root, args.chapter)
    overrides = parse_overrides(args.override)
    settings = load_profile(chapter, args.profile, overrides)  # bad overrides fail here, before a kernel starts
    check_device(args.profile, args.allow_cpu)
    for note in preflight(chapter, args.profile, settings, run_dir=root / "notebooks"):  # the kernel's folder
        print(f"note: {note}", file=sys.stderr, flush=True)
    if args.out:
        out = Path(args.out).expanduser().resolve()
        if out.suffix != ".ipynb" or out.is_relative_to((root / "notebooks").resolve()):
            raise ValueError(f"--out {args.out}: give a .ipynb path outside notebooks/ (where it would overwrite or "
                             "join the chapters), e.g. --out runs/psd-full.ipynb")
    else:
        out = root / "_build" / "executed" / args.profile / nb.name
    if not os.environ.get("MLIC_RESULTS"):  # the results file goes beside the executed copy, not into the book's
        os.environ["MLIC_RESULTS"] = str(out.parent / "results")  # _build/results (its reproduction page)
    env_defaults(root / "_build")  # the run cache is the book's: a chapter the book trained loads here
    print(f"executing {nb.name} with profile={args.profile}" + (f" and {overrides}" if overrides else "")
          + f" -> {out} ...", flush=True)
    seconds = run_chapter(nb, out, args.profile, {"overrides": overrides} if overrides else None,
                          progress=not args.no_progress, log_output=args.log_output)
    print(f"{nb.name}: executed with profile={args.profile} in {seconds:.1f} s -> {out}")
    return 0


def _cmd_teachers(args) -> int:
    from mlic_lib import psd
    from mlic_lib.book import check_device, env_defaults
    from mlic_lib.utils import distributed_info

    check_device(args.profile, args.allow_cpu)
    env_defaults(Path(args.root).resolve() / "_build")  # the run cache the chapter reads
    settings = load_profile("psd", args.profile, parse_overrides(args.override))
    data, S = psd.study_inputs(settings)  # as the chapter builds them
    n = psd.pretrain_teachers(settings, data, S, seed=settings["seeds"][0])
    world, rank, _ = distributed_info()
    print(f"rank {rank} of {world}: trained {n} teacher(s); the others were cached or are another rank's")
    if rank == 0:
        from mlic_lib.engine import cache_root

        print(f"teachers cached under {cache_root()}: `mlic reproduce psd` and `make lab` read them there (for a "
              f"JupyterLab started otherwise, set MLIC_CACHE={cache_root()} before starting it)")
    return 0


def _cmd_profile(args) -> int:
    chapter = args.chapter
    if chapter not in chapters():  # a part of a notebook's name, as `mlic reproduce` takes it (e.g. 02, 05_ltml)
        if not (Path(args.root) / "notebooks").is_dir():
            raise ValueError(f"no chapter {chapter!r}: name one of {', '.join(chapters())} (or, from the repository "
                             "root, a part of a notebook's file name)")
        chapter, _ = _chapter_notebook(Path(args.root).resolve(), chapter)
    print(yaml.safe_dump(load_profile(chapter, args.profile, parse_overrides(args.override)),
                         sort_keys=False), end="")
    return 0


def _cmd_data(args) -> int:
    from mlic_lib.data import download
    from mlic_lib.data.paths import data_root

    if args.root != ".":
        raise ValueError(f"`mlic --root {args.root} data ...` names a repository, which `mlic data` does not read: "
                         f"name the datasets' folder after the command, `mlic data {args.action} ... --data-dir DIR`")
    if args.action == "fake":
        from mlic_lib.data.fake import write_fake

        if not args.name or not args.root_dir:
            raise ValueError("`mlic data fake` needs a NAME and --data-dir DIR (kept apart from real data)")
        ignored = [f"--{k.replace('_', '-')}" for k in ("check", "allow_unverified", "delete_archives")
                   if getattr(args, k)]
        if ignored:  # they were ignored: a user who asked for a check got files written
            raise ValueError(f"{', '.join(ignored)} only apply to the real datasets (`mlic data check` / "
                             "`prepare`); `mlic data fake` writes synthetic files (check them with `mlic data check "
                             "--data-dir DIR`)")
        sizes = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test),
                                   ("image_size", args.image_size)) if v is not None}
        out = write_fake(args.name, args.root_dir, force=args.force, **sizes)
        print(f"{args.name}: synthetic files in the real layout under {out} (use MLIC_DATA={Path(out).resolve()})")
        return 0
    given = [f"--{k.replace('_', '-')}" for k in ("n_train", "n_test", "image_size") if getattr(args, k) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only set the sizes of `mlic data fake`; `mlic data {args.action}` "
                         "handles the real dataset as published (the chapters' profiles choose how much of it to use)")
    if args.name:
        from mlic_lib.data.registry import get

        get(args.name)  # an unknown name is an error that lists the known ones
    root = Path(args.root_dir).expanduser() if args.root_dir else data_root()
    if args.action == "check" or args.check:
        ignored = [f"--{k.replace('_', '-')}" for k in ("force", "allow_unverified", "delete_archives")
                   if getattr(args, k)]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} only apply to `mlic data prepare NAME`; a check changes nothing")
        print(f"datasets under {root}" + ("" if args.root_dir else " ($MLIC_DATA)"))
        states = download.check(root)
        for key, state in states.items():
            if args.name in (None, key):
                print(f"  {key:9s} {state}")
        # a named dataset that is not there is exit status 1, so that a script can branch on it
        return 1 if args.name and not download.usable(states[args.name]) else 0
    if not args.name:
        raise ValueError("name the dataset to prepare, e.g. `mlic data prepare voc2007`")
    marker = download.prepare(args.name, root, allow_unverified=args.allow_unverified,
                              keep_archives=not args.delete_archives, force=args.force)
    print(f"{args.name}: ready ({marker})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlic", description="Run the book's chapters, CPSD's teachers and the real-data preparation.")
    parser.add_argument("--root", default=".", help="repository root (where _config.yml lives), given before the "
                        "command: mlic --root REPO reproduce ... (`mlic data` takes --data-dir DIR instead)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("book", help="execute every chapter and build the HTML book")
    p.add_argument("--profile", default="default", choices=PROFILES, help="default: %(default)s")
    p.add_argument("--only", nargs="*", help="execute only chapters whose file name contains these (a partial book: "
                   "the other chapters are shown as last executed, or missing, so Sphinx warnings are not errors)")
    p.add_argument("--no-strict", action="store_true", help="do not turn Sphinx warnings into errors")
    p.add_argument("--skip-execute", action="store_true", help="rebuild HTML from the last executed copies (a note "
                   "names any executed with another profile than --profile)")
    p.add_argument("--allow-cpu", action="store_true", help="run profile full without a CUDA GPU (refused "
                   "otherwise: the papers' recipes take days on a CPU)")
    p.set_defaults(func=_cmd_book)

    p = sub.add_parser("reproduce", help="execute one chapter with a profile")
    p.add_argument("chapter", help=f"one of {', '.join(chapters())} (or a part of one notebook's file name)")
    p.add_argument("--profile", default="default", choices=PROFILES, help="default: %(default)s")
    p.add_argument("-o", "--override", action="append", default=[],
                   help="key=value passed to the chapter's settings, e.g. train.epochs=3 (repeatable)")
    p.add_argument("--out", help="where to write the executed notebook (default: "
                   "_build/executed/PROFILE/NOTEBOOK, apart from the book's copies); its results JSON goes to "
                   "results/ beside it, unless $MLIC_RESULTS says otherwise")
    p.add_argument("--log-output", action="store_true", help="print the cells' output (training progress, "
                   "verdicts) to stderr as they run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the notebook's cells")
    p.add_argument("--allow-cpu", action="store_true", help="run profile full without a CUDA GPU (refused "
                   "otherwise: the papers' recipes take days on a CPU)")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("profile", help="print a chapter's resolved settings")
    p.add_argument("chapter", help=f"one of {', '.join(chapters())} (or a part of one notebook's file name)")
    p.add_argument("--profile", default="default", choices=PROFILES, help="default: %(default)s")
    p.add_argument("-o", "--override", action="append", default=[], help="key=value, e.g. train.epochs=3")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("teachers", help="train CPSD's teachers into the cache (split across GPUs under torchrun)")
    p.add_argument("--profile", default="full", choices=PROFILES,
                   help="default: %(default)s (COCO-2014 under $MLIC_DATA, a GPU)")
    p.add_argument("-o", "--override", action="append", default=[], help="key=value, as for `mlic reproduce psd`")
    p.add_argument("--allow-cpu", action="store_true", help="run profile full without a CUDA GPU (refused "
                   "otherwise: the papers' recipes take days on a CPU)")
    p.set_defaults(func=_cmd_teachers)

    p = sub.add_parser("data", help="real datasets under $MLIC_DATA",
                       description="check: report which datasets are present (exit status 1 when a named one is not); "
                       "prepare NAME: download (resumable, sha256-verified) and unpack a dataset; fake NAME --data-dir "
                       "DIR: write small synthetic files in the dataset's real layout, for a dry run of a chapter's "
                       "full path")
    p.add_argument("action", choices=("check", "prepare", "fake"), help="check, prepare or fake (see above)")
    p.add_argument("name", nargs="?", help="dataset, e.g. voc2007, coco2014, mnist, cifar10, voc_lt, coco_lt")
    p.add_argument("--check", action="store_true", help="only report whether the dataset is present (exit status 1 "
                   "when it, or a dataset it needs, is not)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="download files whose sha256 is not recorded yet (prints their digest)")
    p.add_argument("--delete-archives", action="store_true", help="remove tar/zip archives after unpacking")
    p.add_argument("--data-dir", dest="root_dir", metavar="DIR", help="the datasets' folder (default: $MLIC_DATA); "
                   "fake: the folder to write into, required and kept apart from your real data")
    p.add_argument("--root", dest="root_dir", help=argparse.SUPPRESS)  # its name before --data-dir; still accepted
    p.add_argument("--n-train", type=int, help="fake only: training images (default 60)")
    p.add_argument("--n-test", type=int, help="fake only: test images (default 40)")
    p.add_argument("--image-size", type=int, help="fake only: image height in pixels (default 64)")
    p.add_argument("--force", action="store_true", help="prepare: unpack again over the dataset (repairs a deleted "
                   "or damaged file; kept archives are re-verified); fake: allow writing into the real data root")
    p.set_defaults(func=_cmd_data)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread while :func:`main` runs, so that it unwinds as Ctrl-C does."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _terminated(signum, frame):
    raise _Terminated(signum)


#: Signals that end a command as Ctrl-C does: a job scheduler or `kill` (SIGTERM), a closed terminal or SSH
#: session (SIGHUP, where the platform has it)
_ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # SIGTERM and SIGHUP unwind as Ctrl-C does, so that a notebook being executed is kept as <name>.failed.ipynb
        # and its kernel shut down (with its pool of training processes), not left as <name>.running.ipynb; the
        # caller's handlers are put back on return
        # a signal ignored on entry stays ignored: `nohup mlic book ...` must survive its terminal closing
        previous = {sig: signal.signal(sig, _terminated) for sig in _ENDING_SIGNALS
                    if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as err:  # OSError: missing data, unwritable folders, network
        print(f"mlic: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # the kernel client's pending asyncio tasks end with the interrupt: without this, asyncio logs each one's
        # traceback ("Task exception was never retrieved") below the message
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        if args.func is _cmd_data and args.action == "prepare" and not args.check:
            after = " a rerun of `mlic data prepare` resumes the partial download"
        else:
            kept = (" a notebook being executed is kept as <name>.failed.ipynb, and" if args.func in (
                _cmd_reproduce, _cmd_book) else "")
            after = f"{kept} a rerun loads the runs that finished (an interrupted one resumes from its last epoch)"
        print(f"mlic: {'terminated' if isinstance(err, _Terminated) else 'interrupted'};{after}", file=sys.stderr)
        return 128 + (err.signum if isinstance(err, _Terminated) else signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
