"""Download, sha256-verify and unpack the real datasets into $MLIC_DATA (default ~/.cache/mlic/data).

    python data_scripts/prepare.py voc2007 coco2014        # same as `mlic data prepare NAME`
    python data_scripts/prepare.py --check                 # what is present

Downloads resume after an interruption; a file whose checksum does not match is moved aside
(``*.bad``) and never unpacked. The URLs and checksums live in ``mlic_lib/data/registry.py``.
"""

from __future__ import annotations

import argparse
import sys

from mlic_lib.data import download
from mlic_lib.data.registry import DATASETS, get


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"one or more of: {', '.join(DATASETS)}")
    parser.add_argument("--check", action="store_true",
                        help="report what is present and exit (status 1 when a named dataset is not)")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="download files whose sha256 is not recorded yet (prints their digest)")
    parser.add_argument("--delete-archives", action="store_true", help="remove tar/zip archives after unpacking")
    parser.add_argument("--force", action="store_true", help="unpack again over the dataset (repairs a deleted or "
                        "damaged file; kept archives are re-verified)")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            get(name)  # every name checked before the first download (or the check)
        ignored = [f"--{k.replace('_', '-')}" for k in ("force", "allow_unverified", "delete_archives")
                   if getattr(args, k)]
        if ignored and (args.check or not args.names):
            raise ValueError(f"{', '.join(ignored)} only apply when preparing datasets: name them, e.g. "
                             f"`python data_scripts/prepare.py voc2007 {ignored[0]}`")
    except ValueError as err:
        print(f"prepare.py: error: {err}", file=sys.stderr)
        return 2
    if args.check or not args.names:
        try:
            states = download.check()
        except ValueError as err:  # MLIC_DATA is a file: a message and status 2, as `mlic data check`
            print(f"prepare.py: error: {err}", file=sys.stderr)
            return 2
        for key, state in states.items():
            if not args.names or key in args.names:
                print(f"{key:9s} {state}")
        return 1 if any(not download.usable(states[n]) for n in args.names) else 0  # a named one is not there
    try:
        for name in args.names:
            marker = download.prepare(name, allow_unverified=args.allow_unverified,
                                      keep_archives=not args.delete_archives, force=args.force)
            print(f"{name}: {marker}")
    except (ValueError, RuntimeError, OSError) as err:  # as `mlic data prepare`: a message, not a traceback
        print(f"prepare.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare.py: interrupted; a rerun resumes the partial download", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
