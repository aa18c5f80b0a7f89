"""Headless Chromium for the viewer's tests and screenshots (Selenium + the system's Chromium and ChromeDriver).

Nothing is downloaded: the browser is the system's (Debian: ``apt-get install chromium chromium-driver``;
``/usr/bin/chromium`` and ``/usr/bin/chromedriver``), or the ones named by ``CRYOPIPE_CHROMIUM`` /
``CRYOPIPE_CHROMEDRIVER``. Selenium is a test dependency (``pip install -e .[test]``).

Screenshots of the main pages for the documentation::

    python -m cryopipe.viewer.browser PROJECT --out docs/viewer

(takes the project page and, for each kind of panel, the first job that has it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["find_chromium", "start_browser", "wait_ready", "page_errors", "screenshot", "element_screenshot",
           "CHROMIUM_FLAGS"]

#: flags for a headless Chromium on a machine without network or screen (a fresh --user-data-dir is added)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


def find_chromium() -> tuple[str | None, str | None, str]:
    """(browser, driver, reason): paths of Chromium and ChromeDriver, or None with the reason they are missing."""
    browser = os.environ.get("CRYOPIPE_CHROMIUM") or next(
        (p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome"))
         if p), None)
    driver = os.environ.get("CRYOPIPE_CHROMEDRIVER") or shutil.which("chromedriver")
    if browser is None or not os.path.isfile(browser):
        return None, driver, "Chromium is not installed (Debian: apt-get install -y chromium chromium-driver)"
    if driver is None or not os.path.isfile(driver):
        return browser, None, "ChromeDriver is not installed (Debian: apt-get install -y chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return browser, driver, "Selenium is not installed (pip install -e '.[test]')"
    return browser, driver, ""


def start_browser(width: int = 1400, height: int = 1000) -> Any:
    """A headless Chromium driven by Selenium, with a fresh profile; ``driver.quit()`` when done.

    Console messages are kept (``goog:loggingPrefs``) so that :func:`page_errors` can report JavaScript errors.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver, why = find_chromium()
    if why:
        raise RuntimeError(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    profile = tempfile.mkdtemp(prefix="cryopipe-chromium-")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(driver))
    drv._cryopipe_profile = profile  # removed by quit() below
    orig_quit = drv.quit

    def quit_and_clean() -> None:
        try:
            orig_quit()
        finally:
            shutil.rmtree(profile, ignore_errors=True)
    drv.quit = quit_and_clean
    return drv


def wait_ready(driver: Any, timeout: float = 20.0, images: bool = True) -> None:
    """Wait until the page's scripts set ``body[data-ready]`` and (``images``) every image has loaded (lazy ones
    only once the browser decided to load them, i.e. near the window)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        ok = driver.execute_script(
            "return document.body && document.body.dataset.ready === '1' && (!arguments[0] || "
            "Array.from(document.images).every(i => i.complete || i.loading === 'lazy'));", images)
        if ok:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{driver.current_url}: page not ready after {timeout:.0f} s")


def page_errors(driver: Any) -> list[str]:
    """JavaScript errors of the current page: uncaught exceptions / rejections the page recorded and SEVERE
    console messages (failed requests included). Reading the console log empties it."""
    errs = [f"page: {e}" for e in (driver.execute_script("return window.__viewerErrors || []") or [])]
    for entry in driver.get_log("browser"):
        if entry.get("level") == "SEVERE":
            errs.append(f"console: {entry.get('message')}")
    return errs


def screenshot(driver: Any, path: str | os.PathLike, max_height: int = 2200, width: int = 1400) -> None:
    """Screenshot of the whole page (up to ``max_height`` pixels) into ``path`` (PNG)."""
    h = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(width, min(max(h, 600), max_height) + 40)
    time.sleep(0.3)
    wait_ready(driver)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))


def element_screenshot(driver: Any, css: str, path: str | os.PathLike, max_height: int = 2400) -> None:
    """Screenshot of one element (even where it reaches beyond the window) into ``path`` (PNG)."""
    import base64

    r = driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height];", css)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": r[0], "y": r[1], "width": r[2], "height": min(r[3], max_height), "scale": 1}})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(base64.b64decode(shot["data"]))


def _wait_attr(driver: Any, css: str, attr: str, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if driver.execute_script("const e = document.querySelector(arguments[0]); "
                                 "return !e || !!e.dataset[arguments[1]];", css, attr):
            return
        time.sleep(0.1)


def _main() -> int:
    from cryopipe.viewer.server import serve_in_thread

    ap = argparse.ArgumentParser(description="screenshots of a project's viewer pages (headless Chromium)")
    ap.add_argument("project")
    ap.add_argument("--out", default="docs/viewer")
    ap.add_argument("--width", type=int, default=1400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cryopipe-view-cache-") as cache:
        srv, _ = serve_in_thread(args.project, cache_dir=cache)
        drv = start_browser(args.width, 1000)
        try:
            base = srv.url.rstrip("/")
            data = srv.app.index.project_json()
            shots: list[tuple[str, str, str | None]] = [("project", "/", None)]
            # per panel: the job types that show it best (first match), else the first job that has it
            prefer = {"iterations": ["Class2D", "Refine3D"], "classes": ["Class2D"], "picks": ["AutoPick"],
                      "postprocess": ["PostProcess"], "fsc": ["Refine3D"], "angles": ["Refine3D", "InitialModel"],
                      "maps": ["PostProcess", "Refine3D"], "tomograms": ["Tomograms"]}
            panels = {j["name"]: srv.app.data.panels(j["name"]) for j in data["jobs"]}
            page_job = next((j for j in data["jobs"] if j["type"] == "Class2D"), None)
            if page_job is not None:
                shots.append((f"job_{page_job['type'].lower()}", "/job/" + page_job["name"], None))
            for key, types in prefer.items():
                panel = "maps" if key == "tomograms" else key
                have = [j for j in data["jobs"] if panel in panels[j["name"]]]
                best = next((j for t in types for j in have if j["type"] == t), have[0] if have else None)
                if best is not None and (key != "tomograms" or best["type"] == "Tomograms"):
                    shots.append((f"{key}_{best['type'].lower()}", "/job/" + best["name"], panel))
            for name, page, panel in shots:
                drv.set_window_size(args.width, 1000)
                drv.get(base + page)
                wait_ready(drv, 60)
                out = Path(args.out) / f"{name}.png"
                if panel is None:
                    screenshot(drv, out)
                else:
                    from selenium.webdriver.common.by import By

                    el = drv.find_element(By.ID, f"p-{panel}")
                    drv.execute_script("arguments[0].scrollIntoView()", el)
                    time.sleep(0.3)
                    wait_ready(drv, 60)
                    if panel == "maps":
                        _wait_attr(drv, "#ngl-viewport", "ready", 30)
                    time.sleep(0.5)
                    element_screenshot(drv, f"#p-{panel}", out)
                print(f"{out}  ({page}; JavaScript errors: {page_errors(drv) or 'none'})")
        finally:
            drv.quit()
            srv.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
