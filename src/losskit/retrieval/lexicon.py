"""LexLIP's lexicon head (Luo et al., ICCV 2023, arXiv 2302.02908): per-token
(or per-patch) features ``[B, T, H]`` -> vocabulary logits ``[B, T, V]`` (a transform and a
decoder, as a masked-language-model head) -> lexicon weights
``w = log(1 + max_t ReLU(logits))`` ``[B, V]`` (non-negative, mostly zero once trained with the
FLOPS regulariser)."""

from __future__ import annotations

from torch import Tensor, nn

from losskit.core.checks import check_int
from losskit.functional.contrastive import lexicon_weights

__all__ = ["LexiconHead"]


class LexiconHead(nn.Module):
    """``LexiconHead(hidden_dim, vocab_size)(features [B, T, H], attention_mask=None) -> [B, V]``."""

    def __init__(self, hidden_dim: int, vocab_size: int):
        super().__init__()
        self.hidden_dim = check_int("hidden_dim", hidden_dim, low=1)
        self.vocab_size = check_int("vocab_size", vocab_size, low=1)
        self.transform = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.LayerNorm(hidden_dim))
        self.decoder = nn.Linear(hidden_dim, vocab_size)

    def logits(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor) or features.dim() != 3 or features.shape[2] != self.hidden_dim:
            raise ValueError(f"features: expected shape [B, T, {self.hidden_dim}], got "
                             f"{list(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
        return self.decoder(self.transform(features))

    def forward(self, features: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return lexicon_weights(self.logits(features), attention_mask)
