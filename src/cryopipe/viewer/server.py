"""The viewer's HTTP server: standard-library ``ThreadingHTTPServer`` on 127.0.0.1, read-only.

Pages (HTML shells filled by the scripts in ``static/``)::

    /                      the project: job graph and table
    /job/<Type>/<jobNNN>/  one job: command, options, log (live), and its panels

JSON (``?job=<Type>/<jobNNN>/`` names the job)::

    /api/project           every job (type, status, times, graph position) and the edges
    /api/job               one job: summary, panels, note, options, up- and downstream jobs
    /api/log               &file=run.out|run.err&offset=N: new log text since byte N
    /api/iterations        per-iteration curves          /api/classes     class gallery (+ selection)
    /api/picks             &offset=&limit=: micrographs  /api/picks/mic   &i=[&threshold=]: picks
    /api/postprocess       FSC, Guinier                  /api/fsc         gold-standard FSC (3D refine)
    /api/angles            angular histogram             /api/maps        maps, tomograms, stacks

Images (PNG, made on demand and cached outside the project) and maps::

    /img/mic.png?job=&i=&lp=       micrograph i, low-passed at lp Å
    /img/class.png?job=&it=&k=     class k of iteration it (2D average, or projection of a 3D class)
    /img/vol.png?job=&file=&view=slice|proj&axis=x|y|z[&index=]
    /img/stack.png?job=&file=&index=
    /map.mrc?job=&file=            the map for the isosurface viewer (block-averaged beyond 160 voxels)

Files are only ever reached through what the viewer itself found in a job (an index into a job's
micrograph list, a class number, a map among the job's maps), never by a path taken from the request, and
requests whose ``Host`` is not this loopback server are refused (no DNS rebinding from a web page).
"""

from __future__ import annotations

import gzip
import json
import math
import mimetypes
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from cryopipe.viewer import render
from cryopipe.viewer.files import StatCache
from cryopipe.viewer.jobdata import JobData
from cryopipe.viewer.project import ProjectIndex, read_log_tail

__all__ = ["Response", "ViewerApp", "ViewerServer", "make_server", "serve_in_thread", "STATIC_DIR", "jsonable"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
_LOGS = ("run.out", "run.err")


@dataclass
class Response:
    """What a route returns."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars made Python numbers and non-finite floats made None (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _json(obj: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(jsonable(obj), separators=(",", ":")).encode(),
                    headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


class ViewerApp:
    """The routes, callable without a socket (``app.handle("/api/project")``).

    Args:
        root: project directory.
        cache_dir: folder for rendered images (None: :func:`cryopipe.viewer.render.default_cache_dir`).
    """

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.index = ProjectIndex(root)
        self.root = self.index.root
        self.files = StatCache()
        self.data = JobData(self.index, self.files)
        folder = Path(cache_dir) if cache_dir is not None else render.default_cache_dir(self.root)
        self.images = render.RenderCache(folder)
        self._static: dict[str, tuple[bytes, bytes | None, str]] = {}
        self._static_lock = threading.Lock()

    # ---------------------------------------------------------------- dispatch
    def handle(self, target: str, accept_gzip: bool = False) -> Response:
        """Answer a GET request for ``target`` (path and query)."""
        parts = urlsplit(target)
        path = unquote(parts.path)
        q = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        try:
            if path in ("/", "/index.html"):
                return self._page("project.html", {"title": f"cryopipe · {self.root.name}", "job": ""})
            if path.startswith("/job/"):
                name = path[len("/job/"):].strip("/") + "/"
                if self.index.job(name) is None:
                    return Response(404, f"no job {name} in this project".encode(), "text/plain; charset=utf-8")
                info = self.index.job(name)
                return self._page("job.html", {"title": f"{info.name} · {self.root.name}", "job": info.name})
            if path.startswith("/static/"):
                return self._static_file(path[len("/static/"):], accept_gzip)
            if path == "/favicon.ico":
                return Response(204, b"", "image/x-icon")
            if path == "/api/health":
                return _json({"ok": True, "root": str(self.root)})
            if path == "/api/project":
                return _json(self.index.project_json())
            if path.startswith(("/api/", "/img/", "/map.mrc")):
                name = q.get("job", "")
                info = self.index.job(name) if name else None
                if info is None:
                    return _error(404, f"no job {name!r} in this project")
                return self._job_route(path, info.name, q)
            return _error(404, f"{path}: no such page")
        except (KeyError, FileNotFoundError, IndexError) as exc:
            return _error(404, str(exc).strip("'\""))
        except ValueError as exc:
            return _error(400, str(exc))
        except Exception as exc:  # a file the viewer cannot read: say so, keep serving
            traceback.print_exc(file=sys.stderr)
            return _error(500, f"{type(exc).__name__}: {exc}")

    def _job_route(self, path: str, name: str, q: dict[str, str]) -> Response:
        d = self.data
        if path == "/api/job":
            return _json(self.job_json(name))
        if path == "/api/log":
            which = q.get("file", "run.out")
            if which not in _LOGS:
                raise ValueError(f"file={which}: one of {', '.join(_LOGS)}")
            off = q.get("offset")
            tail = read_log_tail(self.index.job_dir(name) / which, None if off in (None, "") else int(off))
            info = self.index.job(name)
            tail["status"] = info.status if info else None
            return _json(tail)
        if path == "/api/iterations":
            return _json(d.iterations(name))
        if path == "/api/classes":
            return _json(d.classes(name))
        if path == "/api/picks":
            return _json(d.picks_list(name, int(q.get("offset", 0) or 0), int(q.get("limit", 100) or 100)))
        if path == "/api/picks/mic":
            thr = q.get("threshold")
            return _json(d.picks(name, int(q.get("i", 0)), float(thr) if thr not in (None, "") else None))
        if path == "/api/postprocess":
            return _json(d.postprocess(name))
        if path == "/api/fsc":
            return _json(d.fsc(name))
        if path == "/api/angles":
            return _json(d.angles(name))
        if path == "/api/maps":
            return _json(d.maps(name))
        if path == "/img/mic.png":
            src = d.micrograph_path(name, int(q.get("i", 0)))
            lp = float(q.get("lp", 20) or 20)
            return self._png(src, ("mic", lp), lambda: render.micrograph_png(src, lp))
        if path == "/img/class.png":
            src, idx, is_map = d.class_image(name, int(q.get("it", 0)), int(q.get("k", 1)))
            if is_map:
                return self._png(src, ("classproj",), lambda: render.volume_png(src, "proj", "z"))
            return self._png(src, ("class", idx), lambda: render.image_png(src, idx))
        if path == "/img/vol.png":
            src = d.map_path(name, q.get("file", ""))
            view, axis = q.get("view", "slice"), q.get("axis", "z")
            index = int(q["index"]) if q.get("index", "") != "" else None
            return self._png(src, ("vol", view, axis, index), lambda: render.volume_png(src, view, axis, index))
        if path == "/img/stack.png":
            src = d.map_path(name, q.get("file", ""))
            idx = int(q.get("index", 0) or 0)
            return self._png(src, ("stack", idx), lambda: render.image_png(src, idx))
        if path == "/map.mrc":
            src = d.map_path(name, q.get("file", ""))
            body = self.images.get(self.images.key(src, "iso"), lambda: render.isosurface_map(src), ".mrc")
            return Response(200, body, "application/octet-stream", {"Cache-Control": "no-cache"})
        return _error(404, f"{path}: no such page")

    def _png(self, src: Path, params: tuple, make) -> Response:
        body = self.images.get(self.images.key(src, *params), make)
        return Response(200, body, "image/png", {"Cache-Control": "no-cache"})

    # ---------------------------------------------------------------- job summary
    def job_json(self, name: str) -> dict[str, Any]:
        """The job page's data: summary, panels, note, options, neighbours."""
        info = self.index.job(name)
        assert info is not None
        d = self.index.job_dir(info.name)
        logs = {}
        for f in _LOGS:
            try:
                st = os.stat(d / f)
                logs[f] = {"size": st.st_size, "mtime": st.st_mtime}
            except OSError:
                logs[f] = None
        out = info.to_json()
        out.update(panels=self.data.panels(info.name), note=self.index.note(info.name),
                   options=self.index.job_options(info.name), children=self.index.children(info.name),
                   input_nodes=info.input_nodes, output_nodes=info.output_nodes, logs=logs,
                   folder_exists=d.is_dir(), now=time.time())
        return out

    # ---------------------------------------------------------------- static files and pages
    def _page(self, template: str, values: dict[str, str]) -> Response:
        raw, _, _ = self._load_static(template)
        html = Template(raw.decode("utf-8")).safe_substitute(
            title=_html_escape(values["title"]), job_json=json.dumps(values["job"]).replace("</", "<\\/"),
            root=_html_escape(str(self.root)))
        return Response(200, html.encode("utf-8"), "text/html; charset=utf-8", {"Cache-Control": "no-store"})

    def _load_static(self, rel: str) -> tuple[bytes, bytes | None, str]:
        with self._static_lock:
            hit = self._static.get(rel)
        if hit is not None:
            return hit
        path = (STATIC_DIR / rel).resolve()
        if not str(path).startswith(str(STATIC_DIR) + os.sep) or not path.is_file():
            raise FileNotFoundError(f"/static/{rel}: not found")
        body = path.read_bytes()
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript",):
            ctype += "; charset=utf-8"
        zipped = gzip.compress(body, 6) if len(body) > 4096 else None
        entry = (body, zipped, ctype)
        with self._static_lock:
            self._static[rel] = entry
        return entry

    def _static_file(self, rel: str, accept_gzip: bool) -> Response:
        body, zipped, ctype = self._load_static(rel)
        headers = {"Cache-Control": "max-age=600"}
        if accept_gzip and zipped is not None:
            headers["Content-Encoding"] = "gzip"
            body = zipped
        return Response(200, body, ctype, headers)


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class _Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._host_ok():
            self._send(Response(403, b"forbidden: this viewer answers only to its own loopback address",
                                "text/plain; charset=utf-8"))
            return
        resp = self.server.app.handle(self.path, "gzip" in self.headers.get("Accept-Encoding", ""))
        self._send(resp)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        port = self.server.server_address[1]
        return host in {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}

    def _send(self, resp: Response) -> None:
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(resp.body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in resp.headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(resp.body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            sys.stderr.write(f"[view] {self.address_string()} {format % args}\n")


class ViewerServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` bound to 127.0.0.1 serving a :class:`ViewerApp`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: ViewerApp, port: int = 0, verbose: bool = False):
        self.app = app
        self.verbose = verbose
        super().__init__(("127.0.0.1", int(port)), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


def make_server(root: str | os.PathLike, port: int = 0, cache_dir: str | os.PathLike | None = None,
                verbose: bool = False) -> ViewerServer:
    """A viewer server for the project at ``root`` on 127.0.0.1:``port`` (0: a free port), not yet serving."""
    return ViewerServer(ViewerApp(root, cache_dir), port, verbose)


def serve_in_thread(root: str | os.PathLike, port: int = 0,
                    cache_dir: str | os.PathLike | None = None) -> tuple[ViewerServer, threading.Thread]:
    """Start a viewer in a daemon thread (tests, notebooks); stop it with ``server.shutdown()``."""
    srv = make_server(root, port, cache_dir)
    th = threading.Thread(target=srv.serve_forever, name="cryopipe-view", daemon=True)
    th.start()
    return srv, th
