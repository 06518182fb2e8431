"""Datamodels: linear predictors of a model's outputs from its training set.

A datamodel for an output ``f(x)`` (a logit vector or a margin) is
``f_S(x) ~ b(x) + sum_{i in S} beta_i(x)`` for a model trained on the subset
``S`` (Ilyas et al., "Datamodels: Predicting Predictions from Training Data",
2022).  DMM (Georgiev et al., ICLR 2025, arXiv:2410.23232, Section 3) uses it
to predict what a model retrained without the forget set ``F`` would output:

    f_hat(x) = f(x) - sum_{i in F} beta_i(x)          (per logit)

Two estimators:

* :func:`fit_datamodels` -- the exact, small-scale one: train ``M`` models on
  random subsets (each point kept with probability ``alpha``, default 0.5;
  see :func:`subset_masks`) and regress their outputs
  on the subset indicators.  The datamodels paper fits a LASSO per output
  (``fast_l1``); here it is **ridge** regression in closed form (one solve for
  every output at once), with the penalty chosen on held-out models when not
  given.  With ``M < n`` the dual form ``X^T (X X^T + lam I)^-1 Y`` is used.
* :func:`trak_datamodels` -- TRAK (Park et al., 2023) through the ``traker``
  package (``pip install 'losskit[trak]'``): gradient features of trained
  checkpoints, randomly projected; scores for the *margin* output (TRAK's
  ``image_classification`` task), shape ``[n, T]``.  On a CPU TRAK needs
  ``use_half_precision=False`` and a projection dimension that its
  ``BasicProjector`` handles (a multiple of its block size of 100 here);
  without ``lambda_reg`` the projection must stay below the number of
  training points, or the features' Gram matrix TRAK inverts is singular
  (its scores then come out near zero and uncorrelated with the truth).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from losskit.core.checks import check_hparam, check_int, shape_str
from losskit.recipes.unlearning.data import forget_indices

__all__ = ["Datamodels", "subset_masks", "ridge_datamodels", "fit_datamodels", "trak_datamodels"]


@dataclass
class Datamodels:
    """``weights [n, T, ...]`` (effect of including training point ``i`` on output ``t``) and ``bias [T, ...]``."""

    weights: Tensor
    bias: Tensor | None = None
    ridge: float | None = None
    num_models: int = 0
    method: str = "regression"

    @property
    def n_train(self) -> int:
        return self.weights.shape[0]

    def removal_effect(self, forget) -> Tensor:
        """``sum_{i in F} beta_i``: shape ``[T, ...]``."""
        f = forget_indices(forget, self.n_train)
        return self.weights[f.to(self.weights.device)].sum(0)

    def predict_without(self, outputs: Tensor, forget) -> Tensor:
        """DMM's target ``f(x) - sum_{i in F} beta_i(x)`` from the trained model's ``outputs [T, ...]``."""
        eff = self.removal_effect(forget)
        if outputs.shape != eff.shape:
            raise ValueError(f"outputs: expected the datamodels' output shape {shape_str(eff)}, got "
                             f"{shape_str(outputs)}")
        return outputs - eff.to(outputs)

    def predict(self, subset) -> Tensor:
        """``b + sum_{i in S} beta_i`` for a training subset ``S`` (indices or a mask)."""
        if self.bias is None:
            raise ValueError("predict: these datamodels have no bias (TRAK scores); use predict_without")
        s = torch.as_tensor(subset)
        mask = s if s.dtype == torch.bool else torch.zeros(self.n_train, dtype=torch.bool).index_fill_(
            0, s.long(), True)
        return self.bias + self.weights[mask.to(self.weights.device)].sum(0)


def subset_masks(n: int, num_models: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """``[M, n]`` boolean masks; each point is in each subset independently with probability ``fraction``.

    Independent inclusion (rather than subsets of one fixed size, as in the
    datamodels paper) makes the subset sizes vary, so the regression can tell
    a shift of every ``beta_i`` from a change of the bias: with a fixed size
    ``k`` the data only fix ``beta_i - beta_j``, and a forget set's
    ``sum_{i in F} beta_i`` would be off by ``|F|`` times that shift.
    """
    n = check_int("n", n, low=2)
    num_models = check_int("num_models", num_models, low=1)
    fraction = check_hparam("fraction", fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(num_models, n, generator=gen) < fraction
    for m in range(num_models):  # never an empty or a full subset
        if not masks[m].any():
            masks[m, int(torch.randint(n, (1,), generator=gen))] = True
        if masks[m].all():
            masks[m, int(torch.randint(n, (1,), generator=gen))] = False
    return masks


def _ridge_solve(x: Tensor, y: Tensor, lam: float) -> Tensor:
    m, n = x.shape
    if m < n:  # dual form: X^T (X X^T + lam I)^-1 Y
        k = x @ x.T + lam * torch.eye(m, dtype=x.dtype)
        return x.T @ torch.linalg.solve(k, y)
    return torch.linalg.solve(x.T @ x + lam * torch.eye(n, dtype=x.dtype), x.T @ y)


def ridge_datamodels(masks: Tensor, outputs: Tensor, *, ridge: float | None = None,
                     ridge_grid: Sequence[float] = (0.1, 1.0, 10.0, 100.0), holdout: float = 0.1,
                     seed: int = 0) -> Datamodels:
    """Regress outputs ``[M, T, ...]`` of ``M`` models on their subset masks ``[M, n]``.

    Minimises ``sum_m ||y_m - b - x_m^T beta||^2 + ridge ||beta||^2`` with the
    bias unpenalised (both sides centred).  ``ridge=None`` picks the value of
    ``ridge_grid`` with the lowest squared error on a ``holdout`` fraction of
    the models, then refits on all of them.
    """
    masks = torch.as_tensor(masks)
    if masks.dim() != 2:
        raise ValueError(f"masks: expected [models, n_train], got {shape_str(masks)}")
    if outputs.dim() < 2 or outputs.shape[0] != masks.shape[0]:
        raise ValueError(f"outputs: expected [models={masks.shape[0]}, T, ...], got {shape_str(outputs)}")
    m = masks.shape[0]
    if m < 2:
        raise ValueError(f"masks: a regression needs at least 2 models, got {m}")
    tail = outputs.shape[1:]
    x = masks.to(torch.float64)
    y = outputs.detach().to(torch.float64).reshape(m, -1)

    def fit(rows: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        xr, yr = x[rows], y[rows]
        xm, ym = xr.mean(0), yr.mean(0)
        beta = _ridge_solve(xr - xm, yr - ym, lam)
        return beta, ym - xm @ beta

    if ridge is None:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(m, generator=gen)
        nv = max(1, int(round(holdout * m)))
        if m - nv < 2:
            raise ValueError(f"masks: choosing the ridge penalty on held-out models needs at least 3 models, "
                             f"got {m}; pass ridge=")
        val, tr = perm[:nv], perm[nv:]
        errs = []
        for lam in ridge_grid:
            lam = check_hparam("ridge_grid", lam, low=0.0, low_open=True)
            beta, b = fit(tr, lam)
            errs.append(float(((x[val] @ beta + b - y[val]) ** 2).mean()))
        ridge = float(ridge_grid[min(range(len(errs)), key=errs.__getitem__)])
    ridge = check_hparam("ridge", ridge, low=0.0, low_open=True)
    beta, b = fit(torch.arange(m), ridge)
    return Datamodels(beta.reshape(masks.shape[1], *tail).to(outputs.dtype), b.reshape(tail).to(outputs.dtype),
                      ridge=ridge, num_models=m, method="regression")


def fit_datamodels(train_and_predict: Callable[[Tensor], Tensor], n_train: int, *, num_models: int,
                   fraction: float = 0.5, ridge: float | None = None, seed: int = 0) -> Datamodels:
    """Datamodels by regression over ``num_models`` models trained on random subsets.

    ``train_and_predict(indices)`` trains a fresh model on the training points
    ``indices`` and returns its outputs ``[T, ...]`` on the target points (for
    DMM: every training and validation point).  Cost: ``num_models`` trainings
    on ``fraction * n_train`` points each.
    """
    masks = subset_masks(n_train, num_models, fraction, seed)
    outs = [torch.as_tensor(train_and_predict(mask.nonzero().flatten())).detach() for mask in masks]
    shapes = {tuple(o.shape) for o in outs}
    if len(shapes) != 1:
        raise ValueError(f"train_and_predict: every call must return outputs of one shape, got {sorted(shapes)}")
    return ridge_datamodels(masks, torch.stack(outs), ridge=ridge, seed=seed)


def trak_datamodels(model: nn.Module, checkpoints: Sequence[dict], train: tuple[Tensor, Tensor],
                    targets: tuple[Tensor, Tensor], *, proj_dim: int = 200, batch_size: int = 64,
                    lambda_reg: float = 0.0, save_dir: str | None = None, device: str = "cpu") -> Datamodels:
    """TRAK scores as datamodels for the margin output: ``weights [n_train, T]``, no bias.

    ``checkpoints``: state dicts of independently trained models (TRAK
    averages over them; the DMM paper uses several).  Needs the ``traker``
    package (``pip install 'losskit[trak]'``).  On a CPU: no half precision and
    a ``proj_dim`` that is a multiple of 100 above 100.
    """
    try:
        from trak import TRAKer
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError as e:
        raise ImportError("trak_datamodels needs the traker package: pip install 'losskit[trak]'",
                          name="trak") from e
    proj_dim = check_int("proj_dim", proj_dim, low=1)
    if device == "cpu" and (proj_dim <= 100 or proj_dim % 100):
        raise ValueError(f"proj_dim: on a CPU TRAK's BasicProjector needs a multiple of its block size 100 "
                         f"above 100, got {proj_dim}")
    if not checkpoints:
        raise ValueError("checkpoints: expected at least one state dict")
    xtr, ytr = train
    lambda_reg = check_hparam("lambda_reg", lambda_reg, low=0.0)
    if lambda_reg == 0 and proj_dim >= xtr.shape[0]:
        raise ValueError(f"proj_dim: TRAK inverts the [proj_dim, proj_dim] Gram matrix of the projected training "
                         f"features, whose rank is at most n_train = {xtr.shape[0]}; expected proj_dim < n_train "
                         f"or lambda_reg > 0, got proj_dim {proj_dim} with lambda_reg 0")
    xt, yt = targets
    n_params = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(grad_dim=n_params, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.rademacher,
                               device=device, dtype=torch.float32, block_size=100)
    tmp = tempfile.TemporaryDirectory() if save_dir is None else None
    try:
        traker = TRAKer(model=model, task="image_classification", train_set_size=xtr.shape[0],
                        save_dir=save_dir or tmp.name, device=device, proj_dim=proj_dim,
                        use_half_precision=False, projector=projector, lambda_reg=lambda_reg,
                        logging_level=40)
        for mid, ckpt in enumerate(checkpoints):
            traker.load_checkpoint(ckpt, model_id=mid)
            for s in range(0, xtr.shape[0], batch_size):
                traker.featurize(batch=(xtr[s:s + batch_size], ytr[s:s + batch_size]),
                                 num_samples=min(batch_size, xtr.shape[0] - s))
        traker.finalize_features()
        for mid, ckpt in enumerate(checkpoints):
            traker.start_scoring_checkpoint(exp_name="losskit", checkpoint=ckpt, model_id=mid,
                                            num_targets=xt.shape[0])
            for s in range(0, xt.shape[0], batch_size):
                traker.score(batch=(xt[s:s + batch_size], yt[s:s + batch_size]),
                             num_samples=min(batch_size, xt.shape[0] - s))
        scores = torch.as_tensor(traker.finalize_scores(exp_name="losskit")).float()
    finally:
        if tmp is not None:
            tmp.cleanup()
    if not torch.isfinite(scores).all():
        raise ValueError("trak_datamodels: TRAK returned non-finite scores (try a larger lambda_reg or proj_dim)")
    return Datamodels(scores, None, num_models=len(checkpoints), method="trak")

