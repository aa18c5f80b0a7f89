"""``cryopipe select``: subsets of micrographs (and, later, particles / classes), as RELION's Select job.

Micrograph selection (this module now): ``--i micrographs.star`` with ``--first N`` (the first N micrographs
in file order) or ``--list names.txt | "a.mrc,b.mrc"`` (the named micrographs, in input order). Writes
``<job>/micrographs_selected.star``: every block of the input kept as it is (the ``optics`` table included,
same STAR version), the micrographs table reduced to the selected rows. Registered in the pipeline as
``relion.select.interactive`` with output node ``MicrographGroupMetadata.star.relion``.

Names given with ``--list`` match ``rlnMicrographName`` exactly, or else by file name (``mic001.mrc``) or file
name without extension (``mic001``) when that is unique; an unmatched or ambiguous name is an error.

Structure for further selection modes (``--classes`` for Class2D particles is planned): the row selection is
a pure function on a table (:func:`select_rows`), the file-level functions (:func:`select_micrographs`) read,
select and write, and :func:`main` dispatches on the mode.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from cryopipe.errors import CryopipeError, InputFileError

HELP = ("select a subset of micrographs (--first N, --list names) into micrographs_selected.star, or of 2D classes "
        "(--classes: --select_classes 1,3 | --auto) into particles.star + class_averages.star")


# ------------------------------------------------------------------------------------------------ selection


def parse_name_list(spec: str) -> list[str]:
    """Names from ``--list``: a text file (one name per line, or whitespace/comma separated; ``#`` comments)
    if ``spec`` is an existing file, else a comma-separated list."""
    p = Path(spec)
    if p.is_file():
        text = "\n".join(line.split("#", 1)[0] for line in p.read_text().splitlines())
    else:
        text = spec
    names = [t for t in text.replace(",", " ").split() if t]
    if not names:
        raise CryopipeError(f"--list {spec}: no names given (a file with one micrograph name per line, or a comma list)")
    return names


def match_names(available: list[str], wanted: list[str], what: str = "micrograph") -> np.ndarray:
    """Indices into ``available`` of each name in ``wanted`` (exact, else unique basename, else unique stem)."""
    exact = {n: i for i, n in enumerate(available)}
    by_base: dict[str, list[int]] = {}
    by_stem: dict[str, list[int]] = {}
    for i, n in enumerate(available):
        pp = PurePosixPath(n)
        by_base.setdefault(pp.name, []).append(i)
        by_stem.setdefault(pp.stem, []).append(i)
    out = []
    for w in wanted:
        if w in exact:
            out.append(exact[w])
            continue
        for table in (by_base, by_stem):
            hits = table.get(PurePosixPath(w).name if table is by_base else w, [])
            if len(hits) == 1:
                out.append(hits[0])
                break
            if len(hits) > 1:
                raise CryopipeError(f"--list: {what} name {w!r} is ambiguous ({len(hits)} matches); give the full "
                                    f"rlnMicrographName")
        else:
            raise CryopipeError(f"--list: no {what} named {w!r} in the input (names look like {available[0]!r})")
    return np.asarray(out, dtype=np.int64)


def select_rows(table: pd.DataFrame, *, first: int | None = None, names: list[str] | None = None,
                name_column: str = "rlnMicrographName") -> np.ndarray:
    """Boolean mask of the selected rows of ``table`` (exactly one of ``first`` / ``names``).

    ``first``: the first ``first`` rows (all if there are fewer); ``names``: rows whose ``name_column``
    matches (see :func:`match_names`); duplicates in ``names`` select a row once.
    """
    if (first is None) == (names is None):
        raise CryopipeError("select: give exactly one of --first N or --list names")
    mask = np.zeros(len(table), dtype=bool)
    if first is not None:
        if first < 1:
            raise CryopipeError(f"--first {first}: must be at least 1")
        mask[: min(first, len(table))] = True
        return mask
    if name_column not in table:
        raise CryopipeError(f"select --list: the table has no {name_column} column")
    mask[match_names([str(v) for v in table[name_column]], list(names))] = True
    return mask


@dataclass
class SelectResult:
    """What a selection wrote."""

    output: Path
    n_input: int
    n_selected: int


def _micrograph_block(blocks: dict, path: Path) -> str:
    if isinstance(blocks.get("micrographs"), pd.DataFrame):
        return "micrographs"
    for name, b in blocks.items():
        if isinstance(b, pd.DataFrame) and "rlnMicrographName" in b:
            return name
    raise InputFileError(path, "no micrographs table (rlnMicrographName)", "give a micrographs STAR file")


def select_micrographs(input_star: str | os.PathLike, output_star: str | os.PathLike, *, first: int | None = None,
                       names: list[str] | None = None) -> SelectResult:
    """Write the selected micrographs of ``input_star`` to ``output_star`` (other blocks and version kept)."""
    from cryopipe.io.star import read_star_with_version, write_star

    input_star = Path(input_star)
    blocks, version = read_star_with_version(input_star)
    key = _micrograph_block(blocks, input_star)
    table = blocks[key]
    if "rlnMicrographName" not in table:
        raise InputFileError(input_star, f"data_{key} has no rlnMicrographName column", "give a micrographs STAR file")
    if len(table) == 0:
        raise InputFileError(input_star, f"data_{key} has no rows (an empty or cut-off file?)",
                             "give a micrographs STAR file with micrographs")
    mask = select_rows(table, first=first, names=names)
    out = dict(blocks)
    out[key] = table.loc[mask].reset_index(drop=True)
    write_star(output_star, out, version=version)
    return SelectResult(output=Path(output_star), n_input=len(table), n_selected=int(mask.sum()))


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", dest="input", required=True,
                   help="micrographs STAR file (with --classes: a Class2D run_itNNN_optimiser/model/data.star)")
    p.add_argument("--o", dest="output", default=None,
                   help="output job folder, e.g. Select/job005/ (default: a new Select/jobNNN/ in the project)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--first", type=int, default=None, help="select the first N micrographs")
    mode.add_argument("--list", dest="names", default=None,
                      help="micrographs to select: a text file with one name per line, or a comma-separated list")
    mode.add_argument("--classes", action="store_true",
                      help="select 2D classes of a classification run (see the class selection options below)")
    p.add_argument("--continue", dest="continue_", action="store_true", help="re-run the job given by --o")
    from cryopipe.jobs.select_classes import add_class_arguments

    add_class_arguments(p)


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.log import log
    from cryopipe.pipeline.project import NodeType, ProcessLabel, open_job_dir

    if getattr(args, "classes", False):
        from cryopipe.jobs.select_classes import main_classes

        return main_classes(args)
    names = parse_name_list(args.names) if args.names is not None else None
    with open_job_dir(args.output, "Select", ProcessLabel.SELECT_INTERACTIVE,
                      inputs=[(args.input, NodeType.MICROGRAPHS)], params=vars(args),
                      continue_job=args.continue_) as job:
        res = select_micrographs(args.input, job.path("micrographs_selected.star"), first=args.first, names=names)
        job.add_output(res.output, NodeType.MICROGRAPHS)
        log(f"select: {res.n_selected} of {res.n_input} micrographs -> {job.relpath(res.output)}")
    return 0
