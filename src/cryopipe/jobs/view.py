"""``cryopipe view [PROJECT] [--port N]``: look at a project in the browser (read-only).

Starts a small web server on 127.0.0.1 (a free port unless ``--port``), prints its address and serves until
Ctrl-C. The pages show the project's job graph with each job's status and time, and per job the command, the
log (live while the job runs), iteration curves, class galleries, picks with a figure-of-merit threshold, FSC and
Guinier plots, the angular distribution, map slices, projections and an isosurface, and tomogram slices (see
:mod:`cryopipe.viewer`). The viewer reads the project's own files (``default_pipeline.star`` and the job
folders), so projects made by RELION show as well; it never writes into the project: images it makes are
cached in ``--cache`` (default ``~/.cache/cryopipe/viewer/<project hash>``). Not a pipeline job: no job folder
is made.
"""

from __future__ import annotations

import argparse
import os
import sys
import webbrowser
from pathlib import Path

from cryopipe.errors import CryopipeError

HELP = "look at a project (jobs, logs, plots, classes, picks, maps) in the browser; read-only local web server"

__all__ = ["HELP", "add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("project", nargs="?", default=".",
                   help="project directory (holding default_pipeline.star, or inside one); default: here")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--cache", default=None,
                   help="folder for the images the viewer makes (default: ~/.cache/cryopipe/viewer/<hash>); "
                        "must lie outside the project")
    p.add_argument("--open", dest="open_browser", action="store_true", help="open the page in the default browser")
    p.add_argument("--verbose", action="store_true", help="print every request")


def main(args: argparse.Namespace) -> int:
    from cryopipe.pipeline.project import find_project_root
    from cryopipe.viewer.files import is_inside
    from cryopipe.viewer.server import make_server

    start = Path(args.project)
    if not start.is_dir():
        raise CryopipeError(f"{start}: not a directory (give a project directory)")
    root = find_project_root(start)
    if root is None:
        raise CryopipeError(f"{os.path.abspath(start)}: no default_pipeline.star here or above (give a RELION or "
                            "cryopipe project directory)")
    if args.cache is not None and is_inside(args.cache, root):
        raise CryopipeError(f"--cache {args.cache}: lies inside the project {root}; the viewer never writes into "
                            "a project (choose a folder outside it)")
    if not 0 <= args.port <= 65535:
        raise CryopipeError(f"--port {args.port}: a port is 0 (any free one) to 65535")
    try:
        srv = make_server(root, args.port, args.cache, verbose=args.verbose)
    except OSError as exc:
        raise CryopipeError(f"cannot listen on 127.0.0.1:{args.port} ({exc.strerror or exc}); choose another "
                            "--port or leave it out for a free one") from None
    try:
        n_jobs = len(srv.app.index.pipeline()[0].processes)  # a RELION 3 or garbled pipeline: say so now
    except BaseException:
        srv.server_close()
        raise
    print(f"cryopipe view: {root} ({n_jobs} jobs)", flush=True)
    print(f"cryopipe view: open {srv.url}  (Ctrl-C to stop)", flush=True)
    if args.open_browser:
        webbrowser.open(srv.url)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        print("cryopipe view: stopped", file=sys.stderr)
    finally:
        srv.server_close()
    return 0
