"""The RL recipe the claim experiments share: the config fields every RL-running claim has (``RLRecipe``) and the
one translation of a claim config into the engine's ``RLConfig`` (``recipe_rl_config``).

Examples
--------
>>> from dataclasses import dataclass
>>> from sims.tinygpt.probe import ProbeConfig
>>> @dataclass(frozen=True)
... class Demo(RLRecipe):
...     lr: float = 1e-5
>>> rc = recipe_rl_config(Demo(), seed=3, device="cpu", probe=ProbeConfig(steps=(0, 20)))
>>> (rc.task, rc.algorithm, rc.steps, rc.minibatches, rc.lr, rc.precision, rc.seed)
('counting', 'dapo', 20, 2, 1e-05, 'bf16', 3)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, TypeVar

from sims.tinygpt.probe import ProbeConfig
from sims.tinygpt.rlvr import RLConfig

__all__ = ["RLRecipe", "recipe_rl_config"]

_Recipe = TypeVar("_Recipe", bound="RLRecipe")


@dataclass(frozen=True)
class RLRecipe:
    """The leading fields of a claim config that runs RL (subclasses add theirs after these, and may override a
    default, e.g. ``rl_steps``, without moving the field)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    task: str = "counting"
    algorithm: str = "dapo"
    rl_steps: int = 20
    minibatches: int = 2
    prompts_per_step: int = 8
    group_size: int = 8

    @classmethod
    def default(cls: type[_Recipe], **kw: Any) -> _Recipe:
        """The default preset with the fields in ``kw`` replaced."""
        return replace(cls(), **kw)

    @property
    def updates(self) -> int:
        """AdamW updates of one RL run: ``rl_steps * minibatches``."""
        return self.rl_steps * self.minibatches


def recipe_rl_config(c: Any, *, seed: int, device: str, probe: ProbeConfig, lr: float | None = None,
                     precision: str = "bf16", task: str | None = None, algorithm: str | None = None,
                     **extra: Any) -> RLConfig:
    """``RLConfig`` for one run of claim config ``c`` (its task, algorithm, steps and batch sizes; ``lr`` defaults to
    ``c.lr``); ``task``/``algorithm`` override c's, ``extra`` goes to ``RLConfig`` as is (beta, eps_low, ...)."""
    return RLConfig(task=c.task if task is None else task, algorithm=c.algorithm if algorithm is None else algorithm,
                    steps=c.rl_steps, prompts_per_step=c.prompts_per_step, group_size=c.group_size,
                    minibatches=c.minibatches, lr=c.lr if lr is None else lr, precision=precision, seed=seed,
                    device=device, probe=probe, **extra)
