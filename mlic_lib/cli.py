"""The ``mlic`` command.

::

    mlic book [--profile default] [--only primer]     execute the chapters and build the HTML book
    mlic reproduce CHAPTER [--profile full]            execute one chapter into _build/executed/
    mlic profile CHAPTER [--profile smoke] [-o key=value ...]   show a chapter's resolved settings
    mlic data check                                    report which real datasets are present
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mlic_lib.profiles import PROFILES, chapters, load_profile


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"override {item!r} must look like key=value (e.g. train.epochs=3)")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _cmd_book(args) -> int:
    from mlic_lib.book import build_book

    build_book(args.root, args.profile, args.only, strict=not args.no_strict, skip_execute=args.skip_execute)
    return 0


def _cmd_reproduce(args) -> int:
    from mlic_lib.book import _env_defaults, execute_notebook, notebooks

    root = Path(args.root).resolve()
    _env_defaults(root / "_build")
    nbs = notebooks(root, [args.chapter])
    for nb in nbs:
        out = root / "_build" / "executed" / args.profile / nb.name
        seconds = execute_notebook(nb, out, args.profile)
        print(f"{nb.name}: executed with profile={args.profile} in {seconds:.1f} s -> {out}")
    return 0


def _cmd_profile(args) -> int:
    print(yaml.safe_dump(load_profile(args.chapter, args.profile, _parse_overrides(args.override)),
                         sort_keys=False), end="")
    return 0


def _cmd_data(args) -> int:
    from mlic_lib.data.paths import data_root

    root = data_root()
    expected = {
        "voc2007": root / "VOCdevkit" / "VOC2007" / "Annotations",
        "voc2012": root / "VOCdevkit" / "VOC2012" / "Annotations",
        "coco2014": root / "coco" / "annotations" / "instances_train2014.json",
        "coco2017": root / "coco" / "annotations" / "instances_train2017.json",
    }
    if args.action == "check":
        print(f"MLIC_DATA = {root}")
        for name, path in expected.items():
            print(f"  {name:9s} {'present' if path.exists() else 'missing'}  ({path})")
        return 0
    print(
        "Automatic, sha256-verified downloads are not implemented yet (tracked in the 'Real data and GPU' "
        f"issue). Until then, place the datasets under {root} in their standard layouts:\n"
        "  VOCdevkit/VOC2007/{Annotations,ImageSets/Main,JPEGImages}, VOCdevkit/VOC2012/...\n"
        "  coco/annotations/instances_{train,val}{2014,2017}.json, coco/{train,val}{2014,2017}/*.jpg\n"
        "then run `mlic data check`.",
        file=sys.stderr,
    )
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="repository root (where _config.yml lives)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("book", help="execute every chapter and build the HTML book")
    p.add_argument("--profile", default="default", choices=PROFILES)
    p.add_argument("--only", nargs="*", help="execute only chapters whose file name contains these")
    p.add_argument("--no-strict", action="store_true", help="do not turn Sphinx warnings into errors")
    p.add_argument("--skip-execute", action="store_true", help="rebuild HTML from the last executed copies")
    p.set_defaults(func=_cmd_book)

    p = sub.add_parser("reproduce", help="execute one chapter with a profile")
    p.add_argument("chapter", help="chapter name or part of its file name, e.g. primer, splicemix")
    p.add_argument("--profile", default="default", choices=PROFILES)
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("profile", help="print a chapter's resolved settings")
    p.add_argument("chapter", choices=chapters())
    p.add_argument("--profile", default="default", choices=PROFILES)
    p.add_argument("-o", "--override", action="append", default=[], help="key=value, e.g. train.epochs=3")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("data", help="real datasets under $MLIC_DATA")
    p.add_argument("action", choices=("check", "prepare"))
    p.add_argument("name", nargs="?", help="dataset for prepare, e.g. voc2007")
    p.set_defaults(func=_cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"mlic: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
