"""The figure files a drawing command wrote into an output folder, so that a rerun into the same folder leaves only
this run's figures there.

A command that draws into a folder (``threegate figs`` / ``verify`` / ``compare`` through ``paper_figs.report``,
``python -m threegate.sweep_figs``) records the files it wrote in ``FOLDER/.threegate-figures-COMMAND.json`` (one
record per command, so that two commands drawing into one folder never remove each other's figures). The next run
of that command into that folder removes the files the earlier run recorded and this run did not write again (a
figure whose table is gone, a tutorial with fewer images), then records its own. Only files named in that record
are ever removed: a file the project did not write (the user's notes, a figure saved by hand under the same folder)
stays, and a folder without a record loses nothing.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> d = Path(tempfile.mkdtemp())
>>> for name in ("fig-a.png", "fig-b.png", "notes.txt"):
...     _ = (d / name).write_text("x")
>>> record_written(d, [d / "fig-a.png", d / "fig-b.png"], "report")   # the first run drew a and b
[]
>>> record_written(d, [d / "fig-a.png"], "report")   # the second drew only a: b was this project's, it goes
['fig-b.png']
>>> sorted(p.name for p in d.iterdir() if not p.name.startswith("."))
['fig-a.png', 'notes.txt']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

__all__ = ["record_path", "record_written", "written_before"]


def record_path(out_dir: str | Path, command: str) -> Path:
    """Where ``command``'s record of the files it wrote into ``out_dir`` lives."""
    return Path(out_dir) / f".threegate-figures-{command}.json"


def written_before(out_dir: str | Path, command: str) -> list[str]:
    """The files (paths relative to ``out_dir``, ``/``-separated) the last run of ``command`` into ``out_dir``
    recorded; ``[]`` when there is no record or it cannot be read (then nothing is removed)."""
    record = record_path(out_dir, command)
    try:
        names = json.loads(record.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str)]


def _inside(out_dir: Path, name: str) -> Path | None:
    """``out_dir / name`` when it stays inside ``out_dir`` (a record edited to name ``../x`` removes nothing)."""
    path = out_dir / name
    real, root = path.resolve(), out_dir.resolve()
    return path if real.is_relative_to(root) and real != root else None


def record_written(out_dir: str | Path, written: Iterable[str | Path], command: str) -> list[str]:
    """Remove the files the previous run of ``command`` (e.g. ``"report"``) into ``out_dir`` recorded that are not
    in ``written``, record ``written`` as this run's files, and return the removed names (relative to ``out_dir``,
    sorted).

    ``written``: paths of files this run wrote, inside ``out_dir`` (absolute, or relative to ``out_dir``); a path
    outside it is not recorded.
    """
    out_dir = Path(out_dir)
    now: set[str] = set()
    for w in written:
        p = Path(w) if Path(w).is_absolute() else out_dir / w
        try:
            now.add(p.resolve().relative_to(out_dir.resolve()).as_posix())
        except ValueError:
            continue
    removed = []
    for name in sorted(set(written_before(out_dir, command)) - now):
        path = _inside(out_dir, name)
        if path is not None and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(name)
    record_path(out_dir, command).write_text(json.dumps({"files": sorted(now)}, indent=1) + "\n", encoding="utf-8")
    return removed
