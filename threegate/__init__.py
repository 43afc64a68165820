"""threegate: the paper's results as executable checks, ``threegate.compare(base, tuned)`` for checkpoints, and
``ThreeGateCallback`` for live TRL / ``transformers`` runs.

``import threegate`` stays light: ``threegate.compare`` (the module ``threegate/compare.py``, callable as the Python
API; see its docstring) and ``ThreeGateCallback`` (``threegate/callback.py``) are imported on first use, because
torch and transformers take seconds to import. The science lives in ``theory``, ``proofs_check``, ``sims``,
``paper_figs``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["compare", "ThreeGateCallback", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "compare":
        return importlib.import_module("threegate.compare")
    if name == "ThreeGateCallback":
        return importlib.import_module("threegate.callback").ThreeGateCallback
    raise AttributeError(f"module 'threegate' has no attribute {name!r}")
