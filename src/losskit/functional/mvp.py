"""MVP's training objective: instance-wise logit masking, the gradient-similarity
focal loss and adaptive feature scaling.

Moon et al., "Online Class Incremental Learning on Stochastic Blurry Task
Boundary via Mask and Visual Prompt Tuning" (ICCV 2023, arXiv:2308.09303),
code KHU-AGI/Si-Blurry ``methods/mvp.py``, ``models/mvp.py``.

With the feature ``f_i`` (``[B, D]``), the linear head ``(W, b)``, the mask
logits of the prompt chosen for row ``i`` ``M_i`` (``[B, C]``) and the classes
seen so far ``seen`` (``[C]`` bool):

* instance-wise logit mask: ``z_i = (W f_i + b) * 2 sigma(M_i)``, then
  ``-inf`` on unseen classes (multiply first, then add the ``-inf``);
* gradient-similarity score (closed form per sample, the head's row of the
  label): ``g_i = dCE_i / dW_{y_i} = (p_{i,y_i} - 1) m_{i,y_i} f_i`` and the
  batch-mean gradient ``G_c = (1/B) sum_j (p_{j,c} - 1[y_j = c]) m_{j,c} f_j``;
  ``s_i = 1 - cos(g_i, G_{y_i})`` (mask and features detached, the unscaled
  features, as the official ``_compute_grads``);
* loss per row: ``(1 - alpha) CE_i + alpha s_i^gamma CE_i`` (alpha 0.5,
  gamma 2).  The official code multiplies the *batch-mean* CE by ``s_i^gamma``
  and averages, i.e. ``(1 - alpha) CE_mean + alpha mean(s^gamma) CE_mean``: a
  batch multiplier, offered here only as ``gsf_mode="batch"``;
* adaptive feature scaling: the CE is taken on the logits of
  ``f_i / (1 - cos(W_{y_i}, f_i) + margin)``, the scale detached (margin 0.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losskit.core.checks import check_choice, check_embeddings, check_hparam, check_labels, check_reduction, \
    check_sample_weight, shape_str
from losskit.core.reduction import reduce_loss

__all__ = ["masked_logits", "gradient_similarity_scores", "adaptive_feature_scale", "mvp_loss", "GSF_MODES"]

GSF_MODES = ("per-sample", "batch")


def masked_logits(logits: Tensor, mask_logits: Tensor | None, seen: Tensor | None) -> Tensor:
    """``logits * 2 sigmoid(mask_logits)`` (if given), then ``-inf`` where ``~seen``."""
    z = logits
    if mask_logits is not None:
        if mask_logits.shape != logits.shape:
            raise ValueError(f"mask_logits: expected shape {shape_str(logits)} (as logits), got {shape_str(mask_logits)}")
        z = z * (2 * torch.sigmoid(mask_logits))
    if seen is not None:
        if seen.shape != (logits.shape[1],) or seen.dtype != torch.bool:
            raise ValueError(f"seen: expected a bool tensor of shape [{logits.shape[1]}], got {shape_str(seen)} "
                             f"{seen.dtype}")
        z = z.masked_fill(~seen, float("-inf"))
    return z


def gradient_similarity_scores(features: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                               mask_logits: Tensor | None = None, seen: Tensor | None = None) -> Tensor:
    """``s_i = 1 - cos(dCE_i/dW_{y_i}, d mean_j CE_j / dW_{y_i})`` in closed form, ``[B]``, no gradient."""
    with torch.no_grad():
        f = features.detach()
        raw = F.linear(f, weight.detach(), None if bias is None else bias.detach())
        m = torch.ones_like(raw) if mask_logits is None else 2 * torch.sigmoid(mask_logits.detach())
        p = torch.softmax(masked_logits(raw, mask_logits.detach() if mask_logits is not None else None, seen), 1)
        onehot = F.one_hot(labels, raw.shape[1]).to(raw.dtype)
        coef = (p - onehot) * m                                   # dCE_i / dz_raw_{i,c}
        g_i = coef.gather(1, labels[:, None]) * f                 # [B, D]: row y_i of dCE_i/dW
        G = coef.t() @ f / max(f.shape[0], 1)                     # [C, D]: d mean CE / dW
        return 1 - F.cosine_similarity(g_i, G[labels], dim=1)


def adaptive_feature_scale(features: Tensor, weight: Tensor, labels: Tensor, margin: float = 0.5) -> Tensor:
    """``1 - cos(W_{y_i}, f_i) + margin``, detached, ``[B]``."""
    with torch.no_grad():
        return 1 - F.cosine_similarity(weight.detach()[labels], features.detach(), dim=1) + margin


def mvp_loss(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor | None = None,
             mask_logits: Tensor | None = None, seen: Tensor | None = None, alpha: float = 0.5,
             gamma: float = 2.0, margin: float = 0.5, afs: bool = True, gsf: bool = True,
             gsf_mode: str = "per-sample", reduction: str = "mean", sample_weight: Tensor | None = None) -> Tensor:
    """MVP's classification loss over a linear head (see the module doc); ``[B]`` for ``reduction='none'``
    (with ``gsf_mode="batch"`` the rows are the official code's: every row carries the batch-mean CE)."""
    check_embeddings(features, "features")
    B, D = features.shape
    if weight.dim() != 2 or weight.shape[1] != D:
        raise ValueError(f"weight: expected [C, {D}] (the head's weight), got {shape_str(weight)}")
    C = weight.shape[0]
    labels = check_labels(labels, B, device=features.device, num_classes=C)
    if mask_logits is not None and mask_logits.shape != (B, C):
        raise ValueError(f"mask_logits: expected [{B}, {C}], got {shape_str(mask_logits)}")
    alpha = check_hparam("alpha", alpha, low=0.0, high=1.0)
    gamma = check_hparam("gamma", gamma, low=0.0)
    margin = check_hparam("margin", margin, low=0.0, low_open=True)
    check_choice("gsf_mode", gsf_mode, GSF_MODES)
    reduction = check_reduction(reduction)
    w = check_sample_weight(sample_weight, B, features)
    f = features
    if afs:
        f = f / adaptive_feature_scale(features, weight, labels, margin)[:, None]
    z = masked_logits(F.linear(f, weight, bias), mask_logits, seen)
    ce = F.cross_entropy(z, labels, reduction="none")
    if gsf:
        s = gradient_similarity_scores(features, weight, bias, labels, mask_logits, seen).to(ce.dtype)
        if gsf_mode == "per-sample":
            rows = (1 - alpha) * ce + alpha * s.pow(gamma) * ce
        else:
            cm = ce.mean() if B else ce.sum()
            rows = (1 - alpha) * cm + alpha * s.pow(gamma) * cm
    else:
        rows = ce
    return reduce_loss(rows, reduction, w)
