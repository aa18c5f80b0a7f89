"""The ``cryopipe`` command line.

Each job lives in its own module under :mod:`cryopipe.jobs` and exposes

* ``HELP``: a one-line description shown by ``cryopipe --help``;
* ``add_arguments(parser)``: its options, using RELION's option names where RELION has the same option
  (``--i``, ``--o``, ``--angpix``, ``--ctf``, ``--sym`` …), friendlier aliases welcome;
* ``main(args) -> int``: runs the job from the parsed namespace (the job's Python API is a plain function in the
  same module, which ``main`` calls).

User errors (:class:`cryopipe.errors.CryopipeError`) are printed as one line, exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cryopipe import __version__
from cryopipe.errors import CryopipeError

#: command name -> module implementing it (imported lazily so ``--help`` is fast)
JOBS: dict[str, str] = {
    # in workflow order
    "simulate": "cryopipe.jobs.simulate",
    "select": "cryopipe.jobs.select",
    "autopick": "cryopipe.jobs.autopick",
    "extract": "cryopipe.jobs.extract",
    "class2d": "cryopipe.jobs.class2d",
    "initialmodel": "cryopipe.jobs.initialmodel",
    "refine3d": "cryopipe.jobs.refine3d",
    "reconstruct": "cryopipe.jobs.reconstruct",
    "reconstruct-tomogram": "cryopipe.jobs.reconstruct_tomogram",
    "subtomo": "cryopipe.jobs.subtomo",
    "reconstruct-particle": "cryopipe.jobs.reconstruct_particle",
    "mpr": "cryopipe.jobs.mpr",
    "align-symmetry": "cryopipe.jobs.align_symmetry",
    "mask-create": "cryopipe.jobs.mask_create",
    "postprocess": "cryopipe.jobs.postprocess",
    "star": "cryopipe.jobs.star_tools",
    "demo": "cryopipe.jobs.demo",
    "view": "cryopipe.jobs.view",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where it says something: not for None / False defaults, and not where the help
    text already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def check_common_options(args: argparse.Namespace) -> None:
    """Options shared by many jobs, checked once: ``--angpix`` must be a pixel size (> 0), or the job's own "from
    the file" default (-1) where it has one."""
    angpix = getattr(args, "angpix", None)
    if angpix is not None and angpix <= 0 and angpix != args._parser.get_default("angpix"):
        raise CryopipeError(f"--angpix {angpix:g}: a pixel size must be > 0 Å (leave it out to take it from the "
                            "input file)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryopipe",
        description="cryo-EM / cryo-ET processing with RELION-compatible files. `cryopipe JOB --help` for a job's options.",
    )
    parser.add_argument("--version", action="version", version=f"cryopipe {__version__}")
    sub = parser.add_subparsers(dest="job", metavar="JOB")
    for name, modname in JOBS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:  # a job whose module is not there yet is simply not listed
            if exc.name == modname:
                continue
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "job", None):
        parser.print_help()
        return 0
    try:
        check_common_options(args)
        return int(args._main(args) or 0)
    except CryopipeError as exc:
        print(f"cryopipe {args.job}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # output paths: an existing file in the way, no permission, a full disk ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"cryopipe {args.job}: error: {where}{exc.strerror or exc} (check the output path, its permissions "
              "and the free disk space)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cryopipe {args.job}: interrupted; finished work is kept, run the same command again to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
