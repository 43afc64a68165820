"""The HTML report in a real headless browser (Debian ``chromium``).

A copy of ``index.html`` gets a tiny probe script that, on ``load``, counts images with ``complete &&
naturalWidth > 0`` and records every error event (script errors and failed resource loads); ``--dump-dom`` prints
the DOM with the probe's result. A negative control truncates one PNG and checks the probe sees it fail. A
screenshot of the page must be a valid, non-blank PNG of the requested size.

The report of two compares (``two_compares`` in conftest.py) is opened at a desktop width (1280 px) and a phone
width (390 px) through the DevTools protocol over a pipe (``--remote-debugging-pipe``: no network, no extra
package; ``Emulation.setDeviceMetricsOverride`` sets the viewport, which a headless window cannot make narrower
than 500 px): every image loads, the page has no horizontal scrollbar at the desktop width, and the summary table
is the first thing after the title. Screenshots at both widths are checked and kept under ``$THREEGATE_SHOTS``
when that is set (to look at them).

Chromium is required (CI installs it): ``apt-get install -y chromium``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from paper_figs import report

INSTALL_HINT = ("headless chromium not found: install it with `apt-get update && apt-get install -y chromium` "
                "(Debian/Ubuntu), then rerun")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROBE = """<script>
window.__tgErrors = [];
window.addEventListener("error", function (e) {
  window.__tgErrors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || "error"));
}, true);
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  var m = document.createElement("pre");
  m.id = "tg-probe";
  m.textContent = "TGPROBE" + JSON.stringify({total: imgs.length, loaded: ok, errors: window.__tgErrors});
  document.body.appendChild(m);
});
</script>"""


def find_chromium() -> str:
    """Path of a headless-capable chromium; fails the test (not skips) with the install line when absent."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(INSTALL_HINT)


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser_results")
    pd.DataFrame([dict(run=r, method=m, matrix_type=mt, sparsity=s, model="tinygpt-2L", seed=1)
                  for r, m, s in (("RL-0", "RL", 0.7), ("SFT-0", "SFT", 0.05)) for mt in ("q", "k", "v", "o")]
                 ).to_csv(d / "sparsity.csv", index=False)
    pd.DataFrame({"run": ["dapo"] * 3, "step": [0, 10, 20], "kl": [0.0, 0.01, 0.015]}).to_csv(d / "kl_beta0.csv",
                                                                                              index=False)
    pd.DataFrame([dict(result_id="cor3.4", instances=5, worst_ratio=0.5, verdict="holds", notes="")]
                 ).to_csv(d / "verify.csv", index=False)
    rep = report.render_all(d, d / "report")
    assert len(rep.figures) == 2 and not rep.errors
    return rep


def run_chromium(chromium: str, args: list[str], user_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={user_dir}", *args], capture_output=True, text=True,
                          timeout=120)


def probe(chromium: str, page: Path, tmp_path: Path) -> dict:
    probed = page.with_name("probe_" + page.name)
    probed.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    res = run_chromium(chromium, ["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()], tmp_path / "ud")
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<pre id="tg-probe">TGPROBE(\{.*?\})</pre>', res.stdout)
    assert m, "the probe did not run (page failed to load?): " + res.stdout[-500:]
    return json.loads(m.group(1).replace("&quot;", '"'))


def test_chromium_is_installed(chromium):
    res = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and ("Chromium" in res.stdout or "Chrome" in res.stdout)


def test_missing_chromium_fails_with_the_install_line(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        find_chromium()


def test_page_loads_without_errors_and_every_image_loads(chromium, site, tmp_path):
    result = probe(chromium, site.page, tmp_path)
    assert result == {"total": len(site.figures), "loaded": len(site.figures), "errors": []}


def test_probe_sees_a_broken_image(chromium, site, tmp_path):
    # negative control: the same page with one PNG truncated must report one image not loaded and an error
    copy = tmp_path / "site"
    shutil.copytree(site.page.parent, copy)
    broken = copy / site.figures[0].png.name
    broken.write_bytes(broken.read_bytes()[:100])
    result = probe(chromium, copy / "index.html", tmp_path)
    assert result["total"] == len(site.figures) and result["loaded"] == len(site.figures) - 1
    assert any(broken.name in e for e in result["errors"]), result["errors"]


def test_screenshot_is_a_valid_non_blank_png(chromium, site, tmp_path):
    shot = tmp_path / "page.png"
    res = run_chromium(chromium, ["--window-size=1200,1600", "--hide-scrollbars", f"--screenshot={shot}",
                                  site.page.as_uri()], tmp_path / "ud")
    assert res.returncode == 0, res.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (1600, 1200)
    assert img.std() > 0.05, "screenshot is blank"
    colours = np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200, "a page with figures has many colours; this looks like text only or empty"
    # the heading: dark text in the top band
    assert (img[:120].mean(axis=2) < 0.3).sum() > 500


# ------------------------------------------------------------------------------ DevTools protocol over a pipe
class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4:
    replies out, messages separated by NUL bytes). Offline: no port, no websocket library."""

    def __init__(self, chromium: str, user_dir: Path):
        cmd_r, self._w = os.pipe()
        self._r, res_w = os.pipe()

        def child_fds():  # runs in the child before exec: the pipe ends become fds 3 and 4
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        self.proc = subprocess.Popen([chromium, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={user_dir}",
                                      "about:blank"], pass_fds=(3, 4), preexec_fn=child_fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(res_w)
        self._buf, self._id = b"", 0
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the DevTools pipe during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise TimeoutError(method)

    def page(self, method: str, **params) -> dict:
        return self.send(method, self.session, **params)

    def evaluate(self, expression: str):
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, width: int, height: int) -> None:
        """Load ``url`` in a viewport of ``width`` x ``height`` CSS pixels (a phone below 600 px) and wait until
        the page and its images have loaded."""
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=width < 600)
        self.page("Page.navigate", url=url)
        for _ in range(300):
            if self.evaluate("document.readyState === 'complete' && document.URL") == url:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{url} did not finish loading")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


READER_PROBE = """JSON.stringify({
  innerWidth: window.innerWidth,
  scrollWidth: document.scrollingElement.scrollWidth,
  images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0})),
  afterTitle: (function () { var e = document.querySelector('h1').nextElementSibling;
                             return e ? {id: e.id, firstTable: (e.querySelector('table') || {}).id} : null; })(),
  firstTableOnPage: (document.querySelector('table') || {}).id,
  summaryTop: document.getElementById('summary-table').getBoundingClientRect().top,
  firstFigureTop: (document.querySelector('figure') || {getBoundingClientRect: () => ({top: 1e9})})
                    .getBoundingClientRect().top
})"""

WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}


@pytest.fixture(scope="module")
def devtools(chromium, tmp_path_factory):
    dt = DevTools(chromium, tmp_path_factory.mktemp("cdp_profile"))
    yield dt
    dt.close()


@pytest.mark.parametrize("device", list(WIDTHS))
def test_compare_report_reads_well_at_desktop_and_phone_width(devtools, two_compares, device):
    results, rep = two_compares
    width, height = WIDTHS[device]
    devtools.open(rep.page.as_uri(), width, height)
    seen = json.loads(devtools.evaluate(READER_PROBE))
    assert seen["innerWidth"] == width
    assert len(seen["images"]) == len(rep.figures) > 5
    assert [i["src"] for i in seen["images"] if not i["ok"]] == []  # every <img> loads (naturalWidth > 0)
    assert seen["afterTitle"] == {"id": "summary", "firstTable": "summary-table"}
    assert seen["firstTableOnPage"] == "summary-table" and seen["summaryTop"] < seen["firstFigureTop"]
    if device == "desktop":
        assert seen["scrollWidth"] <= seen["innerWidth"], "horizontal scrollbar at the desktop width"
    shot = devtools.screenshot()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    keep = os.environ.get("THREEGATE_SHOTS")
    path = Path(keep) if keep else results / "shots"
    path.mkdir(parents=True, exist_ok=True)
    (path / f"report-{device}.png").write_bytes(shot)
    img = mpimg.imread(path / f"report-{device}.png")[..., :3]
    assert img.shape[1] == width and img.std() > 0.05


def test_the_width_probe_sees_a_page_wider_than_the_window(devtools, tmp_path):
    # negative control: a 2000 px wide element makes scrollWidth exceed the 1280 px viewport
    page = tmp_path / "wide.html"
    page.write_text('<!DOCTYPE html><html><head><meta name="viewport" content="width=device-width">'
                    '<h1>t</h1><div id="summary"><table id="summary-table"><tr><td>x</td></tr></table></div>'
                    '<div style="width:2000px">wide</div><img src="missing.png"></body></html>')
    devtools.open(page.as_uri(), 1280, 900)
    seen = json.loads(devtools.evaluate(READER_PROBE))
    assert seen["scrollWidth"] > seen["innerWidth"] == 1280
    assert seen["images"] == [{"src": "missing.png", "ok": False}]
