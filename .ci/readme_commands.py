"""Print one of the README's two set-up commands: the first two ```bash blocks under "## Set-up: ...".

    python .ci/readme_commands.py verify|test [--venv PATH]

``verify`` is the first block (installs, runs ``threegate verify``), ``test`` the second (installs the test extras,
runs the default tier). ``--venv PATH`` puts the virtualenv the command creates at PATH instead of ``.venv`` (CI makes
it in a temporary folder); nothing else in the command changes. Exits 1 with one line when the README does not have
exactly the expected shape, so CI fails rather than run something else.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SETUP_HEADING = "## Set-up: two commands on a fresh machine"
VENV = ".venv"
# ".venv" as a whole path component: not part of a longer name (".venv2", "x.venv") and not under another folder
_VENV_WORD = re.compile(r"(?<![\w./-])\.venv(?![\w.-])")
_FENCE = re.compile(r"^```(\w*)\s*$")


class ReadmeShapeError(ValueError):
    """The README's set-up section is not two bash blocks that create and use the virtualenv."""


def setup_section(text: str) -> str:
    """The text under SETUP_HEADING, up to the next ``## `` heading."""
    lines = text.splitlines()
    try:
        start = lines.index(SETUP_HEADING) + 1
    except ValueError:
        raise ReadmeShapeError(f"README.md: heading {SETUP_HEADING!r} not found") from None
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def code_blocks(section: str) -> list[tuple[str, str]]:
    """Every fenced block of the section as ``(language, body)``, in order."""
    blocks, lang, body = [], None, []
    for line in section.splitlines():
        m = _FENCE.match(line)
        if lang is None and m:
            lang, body = m.group(1), []
        elif lang is not None and line.strip() == "```":
            blocks.append((lang, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    if lang is not None:
        raise ReadmeShapeError("README.md: a code block under the set-up heading is not closed")
    return blocks


def setup_commands(text: str) -> dict[str, str]:
    """``{"verify": ..., "test": ...}``: the first two bash blocks under the set-up heading, checked for shape."""
    bash = [body for lang, body in code_blocks(setup_section(text)) if lang == "bash"]
    if len(bash) < 2:
        raise ReadmeShapeError(f"README.md: {len(bash)} bash block(s) under the set-up heading, expected 2")
    verify, test = bash[0], bash[1]
    for name, cmd, runs in (("first", verify, "threegate verify"), ("second", test, "python -m pytest")):
        if runs not in cmd:
            raise ReadmeShapeError(f"README.md: the {name} set-up block does not run {runs!r}")
        if f"python -m venv {VENV}" not in cmd or f". {VENV}/bin/activate" not in cmd:
            raise ReadmeShapeError(f"README.md: the {name} set-up block does not create and activate {VENV}")
        if "-c requirements.lock" not in cmd:
            raise ReadmeShapeError(f"README.md: the {name} set-up block does not install with -c requirements.lock")
    return {"verify": verify, "test": test}


def with_venv(command: str, venv: str) -> str:
    """``command`` with the virtualenv path ``.venv`` replaced by ``venv`` (quoted for bash)."""
    quoted = "'" + venv.replace("'", "'\\''") + "'"
    return _VENV_WORD.sub(lambda _: quoted, command)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["verify", "test"])
    ap.add_argument("--venv", help="create the virtualenv here instead of .venv")
    ap.add_argument("--readme", default=str(README))
    args = ap.parse_args(argv)
    try:
        cmd = setup_commands(Path(args.readme).read_text(encoding="utf-8"))[args.which]
    except (OSError, ReadmeShapeError) as e:
        print(f"readme_commands: {e}", file=sys.stderr)
        return 1
    print(with_venv(cmd, args.venv) if args.venv else cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
