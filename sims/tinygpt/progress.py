"""Per-step progress and end-of-run warnings of the training loops (TinyGPT and HF), through ``logging``.

The loops log to the ``sims.progress`` logger: one INFO record per RL step (step, mean reward, KL) and, once at the
end of a run, a WARNING for each of

* steps with **zero policy gradient**: every group's rewards were equal, so every group-relative advantage is 0
  (GRPO / DAPO / REINFORCE with a group baseline alike); counted over the run;
* a run that left the **stored weights unchanged** (not one entry of the weights the model computes with moved:
  with bf16 storage, every update was below half a bf16 ULP of its weight).

Nothing is printed unless a handler is installed: ``threegate run`` installs one for the run (``show_progress``, a
context manager that restores the logger on exit); a script can call ``logging.basicConfig(level=logging.INFO)``.
Without any handler Python's last-resort handler still prints the WARNINGs to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator, Mapping

import torch

__all__ = ["LOGGER_NAME", "log", "equal_reward_groups", "stored_unchanged", "RunMonitor", "show_progress"]

LOGGER_NAME = "sims.progress"
log = logging.getLogger(LOGGER_NAME)


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> bool:
    """True when every group of ``group_size`` consecutive rewards (prompt-major layout) is constant: then every
    group-relative advantage is exactly 0 and the step's policy gradient vanishes.

    Examples
    --------
    >>> equal_reward_groups(torch.tensor([1., 1., -1., -1.]), 2), equal_reward_groups(torch.tensor([1., -1.]), 2)
    (True, False)
    """
    r = rewards.detach().reshape(-1, group_size)
    return bool((r == r[:, :1]).all())


def stored_unchanged(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> bool:
    """True when no entry of any tensor differs (values compared, so +0 == -0; inputs are finite)."""
    return all(torch.equal(before[n].float().cpu(), after[n].float().cpu()) for n in before)


class RunMonitor:
    """Progress lines and the end-of-run warnings of one run.

    ``step(t, reward=..., kl=..., equal_groups=...)`` after each RL step; ``finish(unchanged)`` once at the end."""

    def __init__(self, run: str, steps: int, precision: str, kl_label: str = "KL") -> None:
        self.run, self.steps, self.precision, self.kl_label = run, steps, precision, kl_label
        self.zero_gradient_steps: list[int] = []

    def step(self, t: int, *, reward: float, kl: float, equal_groups: bool) -> None:
        if equal_groups:
            self.zero_gradient_steps.append(t)
        log.info("%s step %d/%d: reward %+.3f, %s %.3g%s", self.run, t, self.steps, reward, self.kl_label, kl,
                 " (all group rewards equal: zero policy gradient)" if equal_groups else "")

    def finish(self, unchanged: bool) -> None:
        n = len(self.zero_gradient_steps)
        if n:
            first = ", ".join(map(str, self.zero_gradient_steps[:5])) + (", ..." if n > 5 else "")
            log.warning("%s: %d of %d steps had zero policy gradient: every group's rewards were equal "
                        "(steps %s)", self.run, n, self.steps, first)
        if unchanged:
            log.warning("%s: the run left the stored %s weights unchanged (no entry moved in %d steps)",
                        self.run, self.precision, self.steps)


class _StderrHandler(logging.Handler):
    """Writes each record as one line to the ``sys.stderr`` of the moment (so captured streams see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        print(prefix + record.getMessage(), file=sys.stderr, flush=True)


@contextlib.contextmanager
def show_progress(quiet: bool = False) -> Iterator[None]:
    """Print the progress lines (INFO; not with ``quiet``) and warnings of ``sims.progress`` to stderr while inside;
    the logger's level, handlers and propagation are restored on exit."""
    handler = _StderrHandler(logging.WARNING if quiet else logging.INFO)
    prev_level, prev_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(prev_level)
        log.propagate = prev_propagate
