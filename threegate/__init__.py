"""threegate: the paper's results as executable checks, and ``threegate.compare(base, tuned)`` for checkpoints.

``import threegate`` stays light: ``threegate.compare`` (the module ``threegate/compare.py``, callable as the Python
API; see its docstring) is imported on first use. The science lives in ``theory``, ``proofs_check``, ``sims``,
``paper_figs``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["compare", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "compare":
        return importlib.import_module("threegate.compare")
    raise AttributeError(f"module 'threegate' has no attribute {name!r}")
