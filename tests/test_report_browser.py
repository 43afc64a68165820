"""The HTML report in a real headless browser (Debian ``chromium``).

A copy of ``index.html`` gets a tiny probe script that, on ``load``, counts images with ``complete &&
naturalWidth > 0`` and records every error event (script errors and failed resource loads); ``--dump-dom`` prints
the DOM with the probe's result. A negative control truncates one PNG and checks the probe sees it fail. A
screenshot of the page must be a valid, non-blank PNG of the requested size.

Chromium is required (CI installs it): ``apt-get install -y chromium``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
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
