"""The commands a fresh install runs work without the ``tutorials`` extra (jupytext, nbformat, nbclient, ipykernel,
markdown-it-py): ``threegate verify`` (which writes the HTML report), ``threegate figs`` and ``threegate compare``
(with its figures). ``threegate figs --tutorials`` then fails with one line naming the extra to install.

A subprocess blocks those imports with a meta-path finder that raises ``ModuleNotFoundError`` for them, as a
Python without them installed does, and runs the commands through ``python -m threegate``'s entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("jupytext", "nbformat", "nbclient", "ipykernel", "markdown_it")
RUNNER = r'''
import json, runpy, sys
BLOCKED, commands = json.loads(sys.argv[1])

class Block:  # a Python without the tutorials extra
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
try:
    import nbformat  # noqa: F401
    print("BLOCK FAILED")
except ModuleNotFoundError:
    pass
for i, argv in enumerate(commands):
    sys.argv = ["threegate", *argv]
    try:
        runpy.run_module("threegate", run_name="__main__", alter_sys=True)
        rc = 0
    except SystemExit as e:
        rc = e.code
    print(f"RC {i} {rc}", flush=True)
'''


def test_verify_figs_and_compare_run_without_the_notebook_tools(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"model.layers.{i}.self_attn.{t}_proj.weight": torch.randn(8, 6, generator=g).to(torch.bfloat16)
          for i in range(2) for t in "qv"}
    save_file(sd, str(tmp_path / "base.safetensors"))
    save_file({k: (v.float() * 1.01).to(torch.bfloat16) for k, v in sd.items()}, str(tmp_path / "tuned.safetensors"))
    verify_out, compare_out = tmp_path / "verify", tmp_path / "compare"
    commands = [
        ["verify", "--only", "lemE.2", "--no-sims", "--claims", "none", "--out", str(verify_out)],
        ["figs", str(verify_out), "--out", str(tmp_path / "figs")],
        ["compare", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "--k", "2",
         "--out", str(compare_out), "--no-progress"],
        ["figs", str(verify_out), "--tutorials"],
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps([BLOCKED, commands])], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    out, err = proc.stdout, proc.stderr
    assert "BLOCK FAILED" not in out
    rcs = [line.split()[2] for line in out.splitlines() if line.startswith("RC ")]
    assert rcs == ["0", "0", "0", "1"], (out[-3000:], err[-3000:])
    assert "Traceback" not in err and "ModuleNotFoundError" not in err, err[-3000:]
    assert (verify_out / "report" / "index.html").is_file() and (tmp_path / "figs" / "index.html").is_file()
    assert (compare_out / "report" / "index.html").is_file() and "figures skipped" not in err
    error_lines = [ln for ln in err.splitlines() if ln.startswith("threegate figs: error:")]
    assert len(error_lines) == 1 and 'pip install -e ".[tutorials]"' in error_lines[0]
    assert all(m in error_lines[0] for m in ("jupytext", "nbformat", "nbclient", "ipykernel"))
