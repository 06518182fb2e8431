"""Use losskit preference objectives inside TRL's ``DPOTrainer`` (optional extra ``trl``).

    from losskit.integrations.trl import LosskitDPOTrainer
    trainer = LosskitDPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds,
                                processing_class=tok, losskit_loss=losskit.get("madpo", beta=0.1))
    trainer.train()

The subclass replaces only the loss computation: it runs the policy (and the
reference model, or reads precomputed reference log-probs) on TRL's collated
batch, sums the completion-token log-probabilities, and calls the losskit
module with the completion lengths.  Dataset columns named in
``extra_columns`` (default ``sample_weight``, ``reward_margin``, ``margin``)
are kept, collated into ``[B]`` tensors and passed to the loss as keywords
when its ``forward`` accepts them -- a per-sample weight column (TRL issue #5613) and MADPO's reward-model
margins work without further code.

Written against TRL 1.16's batch layout (``input_ids``, ``attention_mask``,
``completion_mask``; chosen rows first, then rejected).  Not supported
(clear error): PEFT without a separate ``ref_model`` and ``ld_alpha``.
TRL's own ``beta``/``loss_type`` settings are ignored: the losskit module's
hyperparameters rule.

TRL is imported when ``LosskitDPOTrainer`` is first looked up, not when this
module is imported; without it that lookup raises an ImportError naming the
extra (``pip install 'losskit[trl]'``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = ["LosskitDPOTrainer", "sequence_logps"]

DEFAULT_EXTRA_COLUMNS = ("sample_weight", "reward_margin", "margin")


def sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log pi(completion tokens) per row and the completion lengths.

    Token ``t`` is scored by the logits at position ``t - 1`` (causal LM shift);
    computed in float32.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    tok = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(1), mask.sum(1)


class _ExtraColumnsCollator:
    """Wraps TRL's collator and adds the requested scalar columns as ``[B]`` float tensors."""

    def __init__(self, base, columns: Sequence[str]):
        self.base = base
        self.columns = tuple(columns)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        extras = {c: [ex.pop(c) for ex in examples] for c in self.columns if c in examples[0]}
        batch = self.base(examples)
        for c, vals in extras.items():
            batch[c] = torch.tensor([float(v) for v in vals], dtype=torch.float32)
        return batch


def _accepted_columns(loss: nn.Module, columns: Sequence[str]) -> tuple[str, ...]:
    """The columns a loss takes: pass a column only to a loss whose forward accepts it
    (``dpo`` has no ``reward_margin``).  losskit objectives list theirs in ``input_names``."""
    names = getattr(loss, "input_names", None)
    if names is None:
        import inspect

        names = inspect.signature(loss.forward).parameters
    return tuple(c for c in columns if c in names)


def _trainer_class() -> type:
    """Build ``LosskitDPOTrainer`` on first use: TRL is imported here, never at import time."""
    global _TRAINER
    if _TRAINER is not None:
        return _TRAINER
    try:
        from trl import DPOTrainer as _DPOTrainer
    except ImportError as e:
        import sys

        need = "; TRL >= 1.16 needs Python >= 3.11" if sys.version_info < (3, 11) else ""
        raise ImportError(f"LosskitDPOTrainer needs TRL (and transformers): pip install 'losskit[trl]'{need}",
                          name="trl") from e

    class LosskitDPOTrainer(_DPOTrainer):
        """``trl.DPOTrainer`` whose loss is any losskit ``preference`` objective."""

        def __init__(self, *args, losskit_loss: nn.Module, extra_columns: Sequence[str] = DEFAULT_EXTRA_COLUMNS,
                     **kwargs):
            if not isinstance(losskit_loss, nn.Module):
                raise TypeError("losskit_loss: expected a losskit objective, e.g. losskit.get('dpo', beta=0.1)")
            self.losskit_loss = losskit_loss
            self.extra_columns = tuple(extra_columns)
            self._loss_columns = _accepted_columns(losskit_loss, self.extra_columns)
            super().__init__(*args, **kwargs)
            if getattr(self, "ld_alpha", None) is not None:
                raise NotImplementedError("LosskitDPOTrainer does not support ld_alpha")
            self.data_collator = _ExtraColumnsCollator(self.data_collator, self.extra_columns)
            self.losskit_loss.to(self.accelerator.device)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            for c in self.extra_columns:
                if c not in self._signature_columns:
                    self._signature_columns.append(c)

        def _reference_logps(self, inputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
            if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
                return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            if self.ref_model is None:
                raise NotImplementedError("LosskitDPOTrainer needs ref_model (or precompute_ref_log_probs=True); "
                                          "PEFT adapters as reference are not supported")
            with torch.no_grad():
                ref, _ = sequence_logps(self.ref_model, inputs["input_ids"], inputs["attention_mask"],
                                        inputs["completion_mask"])
            return ref.chunk(2, dim=0)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            logps, lengths = sequence_logps(model, inputs["input_ids"], inputs["attention_mask"],
                                            inputs["completion_mask"])
            pc, pr = logps.chunk(2, dim=0)
            lc, lr = lengths.chunk(2, dim=0)
            rc, rr = self._reference_logps(inputs)
            kw = {c: inputs[c] for c in self._loss_columns if c in inputs}
            loss = self.losskit_loss(pc, pr, rc.to(pc.dtype), rr.to(pc.dtype), chosen_lengths=lc,
                                     rejected_lengths=lr, **kw)
            with torch.no_grad():
                h = (pc - rc) - (pr - rr)
                for key, val in (("logratio_margin", h.mean()), ("accuracy", (h > 0).float().mean()),
                                 ("logps/chosen", pc.mean()), ("logps/rejected", pr.mean())):
                    self._metrics[mode][key].append(self.accelerator.gather_for_metrics(val.reshape(1)).mean().item())
            return (loss, {"logps": logps.detach()}) if return_outputs else loss

    LosskitDPOTrainer.__module__ = __name__
    _TRAINER = LosskitDPOTrainer
    return _TRAINER


_TRAINER: type | None = None


def __getattr__(name: str) -> Any:
    if name == "LosskitDPOTrainer":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
