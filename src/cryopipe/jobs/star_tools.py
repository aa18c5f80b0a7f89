"""``cryopipe star``: STAR-file utilities with ``relion_star_handler``'s option names: the options, and one call
of :mod:`cryopipe.starops` per operation (what each operation does: :mod:`cryopipe.starops`). One operation per
call, file in → file out (``--i in.star --o out.star``); no job folder is made (RELION's star handler is a
command-line tool, not a pipeline job).
"""

from __future__ import annotations

import argparse

from cryopipe.errors import CryopipeError
from cryopipe.starops.document import _expand_inputs, _say
from cryopipe.starops.files import (
    center_star,
    combine_stars,
    convert_star,
    discard_on_stats_star,
    downgrade_star,
    remove_duplicates_star,
    select_star,
    split_star,
)

HELP = ("STAR utilities as relion_star_handler: --center, --select, --split, --combine, --remove_duplicates, "
        "--discard_on_stats, --convert (3.0<->3.1), --downgrade (3.1 -> Warp/M 3.0)")


# ================================================================================================ documents


# ================================================================================================ center


# ================================================================================================ select


# ================================================================================================ split


# ================================================================================================ combine


# ================================================================================================ duplicates


# ================================================================================================ image statistics


# ================================================================================================ 3.0 / 3.1


# ================================================================================================ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("General")
    g.add_argument("--i", dest="input", nargs="+", required=True,
                   help="input STAR file (--combine: several files or a quoted list/glob \"a.star b*.star\")")
    g.add_argument("--o", dest="output", default=None, help="output STAR file (--split: root of the _splitN files)")
    g.add_argument("--i_tablename", default=None, help="operate on this table (default: particles / micrographs / "
                                                       "movies / unnamed / model_classes)")
    c = p.add_argument_group("Center")
    c.add_argument("--center", action="store_true", help="re-centre particles on a point of the reference")
    c.add_argument("--center_X", type=float, default=0.0, help="x of that point (reference pixels from the centre)")
    c.add_argument("--center_Y", type=float, default=0.0, help="y of that point (pixels)")
    c.add_argument("--center_Z", type=float, default=0.0, help="z of that point (pixels)")
    s = p.add_argument_group("Select")
    s.add_argument("--select", default=None, help="numeric column to select on, e.g. rlnCtfFigureOfMerit")
    s.add_argument("--minval", type=float, default=-99999999.0, help="minimum value (inclusive)")
    s.add_argument("--maxval", type=float, default=99999999.0, help="maximum value (inclusive)")
    s.add_argument("--select_by_str", default=None, help="string column to select on, e.g. rlnMicrographName")
    s.add_argument("--select_include", default=None, help="keep rows whose --select_by_str contains this")
    s.add_argument("--select_exclude", default=None, help="keep rows whose --select_by_str does not contain this")
    d = p.add_argument_group("Discard on image statistics")
    d.add_argument("--discard_on_stats", action="store_true", help="discard images with outlying mean/stddev")
    d.add_argument("--discard_label", default="rlnImageName", help="column with the images")
    d.add_argument("--discard_sigma", type=float, default=4.0, help="discard beyond this many ensemble sigmas")
    m = p.add_argument_group("Combine")
    m.add_argument("--combine", action="store_true", help="combine the --i files (optics groups merged by name)")
    m.add_argument("--check_duplicates", default=None, help="warn about duplicate values of this column")
    sp = p.add_argument_group("Split")
    sp.add_argument("--split", action="store_true", help="split into several files")
    sp.add_argument("--nr_split", type=int, default=-1, help="this many files")
    sp.add_argument("--size_split", type=int, default=-1, help="and/or this many rows per file")
    sp.add_argument("--random_order", action="store_true", help="split a random permutation of the rows")
    sp.add_argument("--random_seed", type=int, default=-1, help="seed of --random_order (negative: random)")
    dd = p.add_argument_group("Duplicates")
    dd.add_argument("--remove_duplicates", type=float, default=-1.0,
                    help="remove particles closer than this (Å) in the same micrograph; negative: off")
    dd.add_argument("--image_angpix", type=float, default=-1.0,
                    help="pixel size (Å) of the micrographs the particles were extracted from (default: optics "
                         "group 1)")
    v = p.add_argument_group("Versions")
    v.add_argument("--convert", action="store_true", help="convert RELION 3.0 <-> 3.1 (relion_convert_star)")
    v.add_argument("--output_version", choices=("3.0", "3.1"), default=None,
                   help="layout --convert writes (default: the other one)")
    v.add_argument("--downgrade", action="store_true",
                   help="3.1 -> the 3.0 table Warp/M expect (dynamo2m relion_star_downgrade); default output "
                        "<stem>_rln3.0.star")
    v.add_argument("--coord_angpix", type=float, default=None,
                   help="--downgrade: divide origins by this pixel size (Å) instead of rlnImagePixelSize")


_OPS = ("center", "select", "select_by_str", "discard_on_stats", "combine", "split", "remove_duplicates", "convert",
        "downgrade")


def _chosen_ops(args: argparse.Namespace) -> list[str]:
    chosen = []
    for op in _OPS:
        val = getattr(args, op)
        if op == "remove_duplicates":
            if val is not None and val > 0:
                chosen.append(op)
        elif val:
            chosen.append(op)
    return chosen


def main(args: argparse.Namespace) -> int:
    ops = _chosen_ops(args)
    if len(ops) != 1:
        raise CryopipeError("give exactly one of --center, --select, --select_by_str, --discard_on_stats, --combine, "
                            f"--split, --remove_duplicates, --convert, --downgrade (got {len(ops)}: "
                            f"{', '.join('--' + o for o in ops) or 'none'})")
    op = ops[0]
    inputs = [str(x) for x in args.input]
    if op != "combine":
        files = _expand_inputs(inputs)
        if len(files) != 1:
            raise CryopipeError(f"--{op} takes one input file (--i), got {len(files)} (only --combine takes several)")
        src = files[0]
    if op != "downgrade" and not args.output:
        raise CryopipeError(f"--{op}: give the output file with --o")

    if op == "center":
        out = center_star(src, args.output, (args.center_X, args.center_Y, args.center_Z), args.i_tablename)
        _say(f"star --center ({args.center_X}, {args.center_Y}, {args.center_Z}) px: written {out}")
    elif op in ("select", "select_by_str"):
        res = select_star(src, args.output, args.select, args.minval, args.maxval, str_label=args.select_by_str,
                          include=args.select_include, exclude=args.select_exclude, tablename=args.i_tablename)
        _say(f"star --{op}: {res.n_selected} of {res.n_input} rows written to {res.output}")
    elif op == "discard_on_stats":
        res = discard_on_stats_star(src, args.output, args.discard_label, args.discard_sigma, args.i_tablename)
        _say(f"star --discard_on_stats: discarded {res.n_input - res.n_selected} of {res.n_input} images; "
             f"written {res.output}")
    elif op == "combine":
        res = combine_stars(inputs, args.output, args.check_duplicates, args.i_tablename)
        _say(f"star --combine: {' + '.join(map(str, res.n_per_input))} = {res.n_total} rows, "
             f"{res.n_optics_groups} optics group(s): written {res.output}")
    elif op == "split":
        outs = split_star(src, args.output, args.nr_split, args.size_split, args.random_order, args.random_seed,
                          args.i_tablename)
        _say(f"star --split: written {len(outs)} files {outs[0]} ... {outs[-1]}")
    elif op == "remove_duplicates":
        res = remove_duplicates_star(src, args.output, args.remove_duplicates, args.image_angpix, args.i_tablename)
        _say(f"star --remove_duplicates: removed {res.n_removed} of {res.n_input} particles; written {res.output} "
             f"(removed ones: {res.removed_file})")
    elif op == "convert":
        out = convert_star(src, args.output, args.output_version)
        _say(f"star --convert: written {out}")
    else:
        out = downgrade_star(src, args.output, args.coord_angpix)
        _say(f"star --downgrade: written {out} (RELION 3.0 layout for Warp/M)")
    return 0
