"""threegate command-line package. The science lives in ``theory``, ``proofs_check``, ``sims``, ``paper_figs``."""

__version__ = "0.1.0"
