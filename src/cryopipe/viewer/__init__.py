"""``cryopipe view``: a read-only project viewer in the browser.

Modules (data flows top to bottom):

* :mod:`cryopipe.viewer.files`    fast partial STAR reads, a cache keyed by file stat, name resolution
* :mod:`cryopipe.viewer.project`  the pipeline: jobs, status, times, graph; notes, options, log tails
* :mod:`cryopipe.viewer.jobdata`  per-job panels: iterations, classes, picks, FSC / Guinier, angles, maps
* :mod:`cryopipe.viewer.render`   PNG images from MRC files (micrographs, classes, slices, projections), cached
  outside the project
* :mod:`cryopipe.viewer.server`   the HTTP server (standard library) and its routes
* ``static/``                     HTML shells, scripts and styles; ``static/vendor/``: NGL (isosurface) and uPlot
  (plots) from their npm packages
* :mod:`cryopipe.viewer.browser`  headless Chromium helpers (tests, screenshots; needs Selenium)

Nothing here imports torch; the server starts in well under a second.
"""

from cryopipe.viewer.server import ViewerApp, ViewerServer, make_server, serve_in_thread

__all__ = ["ViewerApp", "ViewerServer", "make_server", "serve_in_thread"]
