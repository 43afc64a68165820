"""threegate command-line package. The science lives in ``theory``, ``proofs_check``, ``sims``, ``paper_figs``.

``from threegate import ThreeGateCallback`` gives the TRL / ``transformers`` training callback
(``threegate.callback``).
"""

__version__ = "0.1.0"
__all__ = ["ThreeGateCallback"]


def __getattr__(name: str):
    if name == "ThreeGateCallback":
        from threegate.callback import ThreeGateCallback  # lazy: transformers takes seconds to import

        return ThreeGateCallback
    raise AttributeError(f"module 'threegate' has no attribute {name!r}")
