"""Lemma F.9 on real GRPO / DAPO steps on TRL: the token ratios ``r_t = pi_{theta+}(y_t) / pi_theta(y_t)`` of each
optimizer step, on that step's own sampled completions.

Lemma F.9 (clip-only, beta = 0) assumes every token ratio of a step lies in the band [1 - eps, 1 + eps]; PPO / DAPO
clipping only stops the gradient of out-of-range tokens, so whether the assumption holds on a real run is an
empirical question (``../shared/paper/THEORY.md``). ``BandProbe`` answers it for TRL's ``GRPOTrainer``:

* before the step, every micro-batch's completion log-probabilities ``log pi_theta(y_t)`` under the weights the step
  starts from (one extra no-grad forward, in ``compute_loss``; ``completion_logps``, the project's own forward, not
  TRL's private log-prob helper);
* after the optimizer step (``on_step_end``), the same tokens under the new weights (a second no-grad forward), so
  ``log r_t`` is exactly the difference of two forwards of one function at two weight vectors -- a step that moves
  no weight gives ``r_t = 1`` exactly (tested);
* per step: the fraction of completion tokens with ``r_t`` outside the run's clip band [1 - eps_low, 1 + eps_high]
  (metric ``token_ratio_out_of_band_frac``), ``max |log r_t|`` (``token_ratio_max_abs_log``) and Lemma F.9's check
  (``theory.kl_leash.lemF9``) with the symmetric ``eps = max(eps_low, eps_high)`` -- the same rows the TinyGPT probe
  writes (``sims.tinygpt.probe``), so the ``clip_eps`` table and the ``lemma_f9_band_hypothesis`` verdict read them
  unchanged.

With ``beta = 0`` (clip only; no reference model in TRL, which then logs no KL) and full fine-tuning, the probe also
keeps a frozen copy of the base model and records Fig. 15's quantity per step: the token-wise KL(pi_theta ||
pi_base) over the whole vocabulary (float64 log-softmax of ``logits / temperature``), averaged over the step's
completion tokens (metric ``kl_tok_base``, as the TinyGPT probe names it, so the ``kl_beta0`` table reads it).

Cost: two no-grad forward passes per micro-batch (no generation), on top of TRL's forward and backward; with the
KL, one more (the base model's; the current model's log-softmax after the step serves both the ratios and the KL) and
a second copy of the weights.
Single process only (the ratios of one rank's micro-batches); the forwards run wherever the trainer's model is.
With dropout the two forwards would differ by the dropout mask: the probe runs them in eval mode (no dropout) and
restores the mode.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from typing import Any, Iterator

import numpy as np
import torch

from theory.errors import InputError
from theory.kl_leash import lemF9

__all__ = ["band_probed_grpo_trainer", "frozen_copy", "BAND_METRICS"]

BAND_METRICS = ("token_ratio_out_of_band_frac", "token_ratio_max_abs_log", "kl_tok_base")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of ``model`` whose modules run their class's ``forward`` (see ``BandProbedGRPOTrainer``)."""
    patched = [name for name, mod in model.named_modules() if "forward" in vars(mod)]
    if patched:
        raise InputError(f"band probe: module(s) {patched[:3]} have a patched forward; copy the model before "
                         "handing it to a trainer")
    return copy.deepcopy(model).eval().requires_grad_(False)


#: memory for one chunk of the float64 log-softmax tensors (3 of rows x positions x vocabulary, 8 bytes each)
KL_CHUNK_BYTES = 1 << 30


def _log_softmax_chunks(trainer, model, inputs: dict[str, Any]) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, log pi(. | prefix))`` over the vocabulary at every completion position (float64 log-softmax of
    ``logits / temperature``), no grad, eval mode, in row chunks under ``KL_CHUNK_BYTES``. Only the completion
    positions' logits are formed (``logits_to_keep``): App. C's 1024-token completions over a 150k vocabulary go one
    row at a time."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    n = inputs["completion_ids"].size(1)
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    step = max(1, KL_CHUNK_BYTES // (3 * 8 * (n + 1) * vocab))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, ids.shape[0], step):
            rows = slice(start, start + step)
            with torch.no_grad(), trainer.accelerator.autocast():
                logits = model(input_ids=ids[rows], attention_mask=mask[rows], logits_to_keep=n + 1).logits[:, :-1]
            yield rows, torch.log_softmax(logits.double() / trainer.temperature, dim=-1)
    finally:
        model.train(was_training)


def completion_logps(trainer, model, inputs: dict[str, Any], base: torch.nn.Module | None = None
                     ) -> tuple[torch.Tensor, float, int]:
    """``log pi(y_t)`` of every completion token (batch x completion length, float64) from one forward of ``model``;
    with ``base``, also the sum over the unmasked completion tokens of KL(pi_model || pi_base) at each position
    (whole vocabulary) and their count, from one forward of ``base`` (else ``0.0``)."""
    tokens = inputs["completion_ids"]
    keep = inputs["completion_mask"].bool()
    refs = _log_softmax_chunks(trainer, base, inputs) if base is not None else itertools.repeat((None, None))
    logps, kl_sum = [], 0.0
    for (rows, now), (_, ref) in zip(_log_softmax_chunks(trainer, model, inputs), refs):
        logps.append(now.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1))
        if ref is not None:
            kl_sum += float((now.exp() * (now - ref)).sum(-1)[keep[rows]].sum())
    return torch.cat(logps), kl_sum, int(keep.sum())


def step_ratios(old: list[tuple[torch.Tensor, torch.Tensor]], new: list[torch.Tensor]) -> list[np.ndarray]:
    """Per completion, ``r_t = exp(new - old)`` on its unmasked tokens (float64); ``old`` holds (logps, mask)."""
    out = []
    for (lp_old, mask), lp_new in zip(old, new):
        keep = mask.bool().cpu()
        d = (lp_new.cpu() - lp_old.cpu())
        out += [np.exp(d[i][keep[i]].numpy()) for i in range(d.shape[0])]
    return out


def band_rows(step: int, ratios: list[np.ndarray], band: tuple[float, float], *, run: str
              ) -> tuple[list[dict], list[dict]]:
    """The metric rows and the Lemma F.9 check row of one step (``sims.tinygpt.probe``'s columns)."""
    seqs = [r for r in ratios if len(r)]
    flat = np.concatenate(seqs) if seqs else np.zeros(0)
    metrics = [{"run": run, "kind": "rlvr", "step": step, "matrix": "", "metric": "token_ratio_max_abs_log",
                "value": float(np.max(np.abs(np.log(flat)))) if flat.size else 0.0}]
    if not flat.size:
        return metrics, []
    lo, hi = 1 - band[0], 1 + band[1]
    metrics.append({"run": run, "kind": "rlvr", "step": step, "matrix": "", "metric": "token_ratio_out_of_band_frac",
                    "value": float(np.mean((flat < lo) | (flat > hi)))})
    # One symmetric band in the lemma: eps = max(eps_low, eps_high), the widest band the clipping allows.
    check = lemF9(seqs, max(band))
    return metrics, [{"run": run, "kind": "rlvr", "step": step, "matrix": "", "reference": "prev",
                      "fisher_estimator": None, **check.as_row()}]


@functools.lru_cache(maxsize=None)
def band_probed_grpo_trainer() -> type:
    """``GRPOTrainer`` that records each optimizer step's token ratios (defined on first use: trl is heavy)."""
    from transformers import TrainerCallback  # heavy (~3.5 s with peft): real-model runs only
    from trl import GRPOTrainer  # heavy (~3.6 s with peft): real-model runs only

    class _AfterStep(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            self.trainer.record_band_step(state.global_step)

    class BandProbedGRPOTrainer(GRPOTrainer):
        """TRL's ``GRPOTrainer`` plus ``band_metrics`` / ``band_checks`` (rows per optimizer step; see the module)."""

        def __init__(self, *args, band: tuple[float, float], run_name: str = "hf_rlvr",
                     base_copy: torch.nn.Module | None = None, **kwargs):
            """``base_copy``: a frozen copy of the starting model for Fig. 15's KL (``frozen_copy``), made *before*
            the trainer exists: accelerate / TRL replace ``model.forward`` by an instance attribute that closes over
            the original model, and a deep copy made afterwards would run the trained model's forward (measured:
            KL exactly 0 on a step that moved every weight)."""
            super().__init__(*args, **kwargs)
            self.base_copy = base_copy
            if not (0 < band[0] < 1 and band[1] > 0 and all(math.isfinite(b) for b in band)):
                raise InputError(f"clip band needs 0 < eps_low < 1 and eps_high > 0, got {band}")
            self.band, self.run_name = band, run_name
            self.band_metrics: list[dict] = []
            self.band_checks: list[dict] = []
            self._pending: list[tuple[dict, torch.Tensor, torch.nn.Module]] = []
            self.add_callback(_AfterStep(self))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:  # a training micro-batch: keep its tokens and their log-probs before the step
                self._pending.append((inputs, completion_logps(self, model, inputs)[0], model))
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def record_band_step(self, step: int) -> None:
            pending, self._pending = self._pending, []
            if not pending:
                return
            old = [(lp, inp["completion_mask"]) for inp, lp, _ in pending]
            after = [completion_logps(self, model, inp, self.base_copy) for inp, _, model in pending]
            metrics, checks = band_rows(step, step_ratios(old, [lp for lp, _, _ in after]), self.band,
                                        run=self.run_name)
            if self.base_copy is not None:
                tokens = sum(c for _, _, c in after)
                metrics.append({"run": self.run_name, "kind": "rlvr", "step": step, "matrix": "",
                                "metric": "kl_tok_base", "value": sum(k for _, k, _ in after) / tokens if tokens else 0.0})
            self.band_metrics += metrics
            self.band_checks += checks

    return BandProbedGRPOTrainer
