"""FRUGAL (Zmushko et al., ICML 2025): full-rank updates with gradient splitting.

For every *projectable* matrix ``W`` (the Linear weights of a model) with
gradient ``G`` and the current subspace ``P`` (renewed every ``update_gap``
steps, Adam state reset then)::

    U  = up(Adam(down(G))) * lr * proj_lr_scale                 # state-full part
    U += sign(G - up(down(G))) * lr * proj_lr_scale * residual_lr_scale   # state-free part (signSGD)
    W <- W * (1 - lr * weight_decay) - U                          # decoupled weight decay

``residual="sgd"`` uses the residual itself instead of its sign and
``residual="none"`` drops it (GaLore's rule).  ``projection="blockwise"``
(the paper's main setting, ``block_order="descending"``) gives a ``rho``
fraction of whole tensors full AdamW and the rest the state-free rule; the
other projections are in :mod:`losskit.optim.projections`.  Every other
parameter (embeddings, norms, biases, the output head) is trained by plain
AdamW.  :func:`frugal_param_groups` makes that split for a model.

Sources: the paper (arXiv:2411.07837, Algorithm 1 and Section 4) and the
official code (``frugal/proj_optimizer_templates.py``, ``frugal/adamw.py``,
``frugal/galore_projector.py`` of the authors' repository).  Deviations from
the official code are listed in docs/optim.md.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from losskit.core.checks import check_bool, check_choice, check_hparam, check_int
from losskit.core.registry import Paper, register
from losskit.optim.projections import PROJECTIONS, Subspace, make_subspace, renewal_generator, side_and_rank

__all__ = ["FRUGAL", "FRUGAL_PAPER", "frugal_param_groups", "optimizer_state_bytes", "frugal_state_bytes",
           "adamw_state_bytes", "blockwise_active", "RESIDUAL_RULES", "BLOCK_ORDERS"]

FRUGAL_PAPER = Paper("FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training", 2025,
                     "2411.07837")
RESIDUAL_RULES = ("signsgd", "sgd", "none")
BLOCK_ORDERS = ("descending", "ascending", "random")


def frugal_param_groups(model: nn.Module, *, exclude: Iterable[str] = (), output_head: str | None = "auto",
                        ) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into FRUGAL's two groups.

    Projectable: the ``weight`` of every ``nn.Linear`` except the output head,
    modules whose qualified name contains one of ``exclude``, and weights
    shared with a non-Linear module (a tied embedding).  Everything else
    (embeddings, norms, biases, convolutions, the head) goes to the AdamW group.

    ``output_head="auto"`` treats the last ``nn.Linear`` in ``model.modules()``
    order as the head; pass its qualified name instead, or ``None`` to project
    every Linear.  Returns ``[{"params": [...], "projectable": False},
    {"params": [...], "projectable": True}]`` without empty groups.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    exclude = tuple(exclude)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if output_head == "auto":
        head = linears[-1][0] if linears else None
    else:
        head = output_head
        if head is not None and head not in dict(linears):
            raise ValueError(f"output_head: expected the qualified name of an nn.Linear in the model "
                             f"({', '.join(n for n, _ in linears) or 'none'}), got {head!r}")
    elsewhere = {id(p) for _, m in model.named_modules() if not isinstance(m, nn.Linear)
                 for p in m.parameters(recurse=False)}
    proj_ids: set[int] = set()
    proj: list[Tensor] = []
    for name, m in linears:
        w = m.weight
        if name == head or any(e in name for e in exclude) or not w.requires_grad or id(w) in elsewhere:
            continue
        if id(w) not in proj_ids:
            proj_ids.add(id(w))
            proj.append(w)
    # a weight tied between a projectable Linear and the head stays on AdamW
    if head is not None:
        hw = dict(linears)[head].weight
        if id(hw) in proj_ids:
            proj = [p for p in proj if p is not hw]
            proj_ids.discard(id(hw))
    seen: set[int] = set()
    rest = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in proj_ids and id(p) not in seen:
            seen.add(id(p))
            rest.append(p)
    groups = [{"params": rest, "projectable": False}, {"params": proj, "projectable": True}]
    return [g for g in groups if g["params"]]


def blockwise_active(n: int, rho: float, renewal: int, block_order: str = "descending", seed: int = 0) -> list[int]:
    """The indices (among a group's ``n`` projectable tensors, in order) that blockwise FRUGAL keeps
    on Adam during renewal ``renewal`` (0 = the first ``update_gap`` steps): ``round(n * rho)``
    tensors; ``descending`` (the paper's) starts at the last tensor and moves down by that many
    each renewal, ``ascending`` starts at the first, ``random`` draws them from ``seed``."""
    k = round(n * rho)
    if k >= n:
        return list(range(n))
    if k == 0:
        return []
    if block_order == "descending":  # the paper's setting: start at the last tensor, move down by k
        start = (n - 1 - renewal * k) % n
        return sorted((start - i) % n for i in range(k))
    if block_order == "ascending":
        start = (renewal * k) % n
        return sorted((start + i) % n for i in range(k))
    gen = renewal_generator(seed, renewal, -1)
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def adamw_state_bytes(params: Iterable[Tensor]) -> int:
    """The bytes of ``torch.optim.AdamW``'s state for ``params`` once each has stepped (default
    options, CPU or non-capturable): ``exp_avg`` and ``exp_avg_sq`` like each parameter, plus a
    float32 0-d ``step`` tensor each; from the shapes and dtypes alone."""
    total = 0
    for p in _unique(params):
        total += 2 * p.numel() * p.element_size() + 4
    return total


def _unique(params) -> list[Tensor]:
    if isinstance(params, Tensor):
        params = [params]
    out, seen = [], set()
    for p in params:
        for q in (p["params"] if isinstance(p, dict) else [p]):
            if id(q) not in seen:
                seen.add(id(q))
                out.append(q)
    return out


def frugal_state_bytes(params, *, steps: int | None = None, **frugal_kwargs) -> dict[str, Any]:
    """FRUGAL's optimizer-state bytes for ``params``, computed from the parameter split, the shapes
    and the dtypes alone (no training; meta tensors work): exactly what
    :meth:`FRUGAL.state_bytes` measures after any step of each renewal when every parameter has
    a gradient.

    ``params`` and ``frugal_kwargs`` are what :class:`FRUGAL` takes (e.g.
    ``frugal_param_groups(model)``, ``rho=0.25, projection="svd"``).  ``steps`` (default: one
    ``update_gap`` per projectable tensor of the largest group, which covers every block set of the
    deterministic blockwise orders) gives the renewals counted.  Returns ``per_renewal`` (one
    ``{"moments", "projectors", "total"}`` per renewal), ``peak`` and ``mean`` (of the totals),
    ``adamw`` (:func:`adamw_state_bytes` of the same parameters) and the parameter counts
    ``projectable``, ``other`` and ``adam_projectable`` (projectable parameters whose full
    moments Adam keeps in the peak renewal: the blockwise granularity).
    """
    opt = FRUGAL(params, **frugal_kwargs)
    n_proj = max((len(opt._projectable(g)) for g in opt.param_groups), default=0)
    gap = min(g["update_gap"] for g in opt.param_groups)
    renewals = max(1, n_proj) if steps is None else max(1, -(-int(steps) // gap))
    per = [opt.expected_state_bytes(j) for j in range(renewals)]
    totals = [r["total"] for r in per]
    peak = max(range(renewals), key=totals.__getitem__)
    proj_ids = {id(p) for g in opt.param_groups for p in opt._projectable(g)}
    every = _unique(opt.param_groups)
    return {"per_renewal": per, "peak": totals[peak], "mean": sum(totals) / len(totals),
            "adamw": adamw_state_bytes(every),
            "projectable": sum(p.numel() for p in every if id(p) in proj_ids),
            "other": sum(p.numel() for p in every if id(p) not in proj_ids),
            "adam_projectable": opt._adam_projectable(peak)}


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state`` (any optimizer),
    counted from the tensors themselves (``numel * element_size``); step
    counters stored as 0-d tensors are included."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return sum(_tensor_bytes(s) for s in optimizer.state.values())


@register("frugal", family="optim", kind="optimizer", task="other", paper=FRUGAL_PAPER,
          summary="FRUGAL: Adam in a subspace of each Linear weight (blockwise, SVD, random, randperm, RandK), "
                  "signSGD/SGD on the residual, AdamW elsewhere; subspace renewed every update_gap steps.")
class FRUGAL(torch.optim.Optimizer):
    """FRUGAL as a ``torch.optim.Optimizer``.

    ``params``: parameters or groups.  A group's ``"projectable"`` key says
    whether its tensors get the FRUGAL split (each must be 2-D); without it,
    2-D tensors are projectable and the others get AdamW.  Use
    :func:`frugal_param_groups` (``FRUGAL(frugal_param_groups(model))``) so
    that embeddings and the output head stay on AdamW as in the paper.

    Defaults are the paper's: ``rho=0.25``, ``update_gap=200``,
    ``proj_lr_scale=1`` (``s_p``), ``residual_lr_scale=1`` (``s_i``; 0.1 for
    fine-tuning), blockwise projection in descending block order, signSGD on
    the residual.  ``weight_decay`` (decoupled, ``W *= 1 - lr * wd`` for every
    parameter) defaults to torch's AdamW value 0.01.  ``seed`` fixes every
    random subspace (the same on every process).  ``sync_subspace``: with an
    initialised ``torch.distributed`` group of more than one process, the SVD
    subspaces are broadcast from rank 0 (the random ones are equal by seeding).
    """

    def __init__(self, params, lr: float = 1e-3, rho: float = 0.25, projection: str = "blockwise",
                 residual: str = "signsgd", update_gap: int = 200, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, proj_lr_scale: float = 1.0,
                 residual_lr_scale: float = 1.0, block_order: str = "descending", seed: int = 0,
                 sync_subspace: bool = True):
        check_hparam("lr", lr, low=0)
        check_hparam("rho", rho, low=0, high=1)
        check_choice("projection", projection, PROJECTIONS)
        check_choice("residual", residual, RESIDUAL_RULES)
        check_int("update_gap", update_gap, low=1)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        check_hparam("betas[0]", betas[0], low=0, high=1, high_open=True)
        check_hparam("betas[1]", betas[1], low=0, high=1, high_open=True)
        check_hparam("eps", eps, low=0)
        check_hparam("weight_decay", weight_decay, low=0)
        check_hparam("proj_lr_scale", proj_lr_scale, low=0)
        check_hparam("residual_lr_scale", residual_lr_scale, low=0)
        check_choice("block_order", block_order, BLOCK_ORDERS)
        check_int("seed", seed, low=0)
        check_bool("sync_subspace", sync_subspace)
        defaults = dict(lr=lr, rho=rho, projection=projection, residual=residual, update_gap=update_gap,
                        betas=tuple(betas), eps=eps, weight_decay=weight_decay, proj_lr_scale=proj_lr_scale,
                        residual_lr_scale=residual_lr_scale, block_order=block_order, seed=seed,
                        sync_subspace=sync_subspace)
        if isinstance(params, Tensor):
            raise TypeError("params: expected an iterable of tensors or of parameter groups, got a Tensor")
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        n = len(self.param_groups)
        ps = param_group.get("params")
        ps = [ps] if isinstance(ps, Tensor) else list(ps if ps is not None else [])
        if not ps:
            raise ValueError(f"param group {n} is empty: every parameter group needs at least one tensor "
                             "(frugal_param_groups drops empty groups)")
        for k in ("rho",):
            if k in param_group:
                check_hparam(f"param group {n} {k}", param_group[k], low=0, high=1)
        if "projection" in param_group:
            check_choice(f"param group {n} projection", param_group["projection"], PROJECTIONS)
        if "residual" in param_group:
            check_choice(f"param group {n} residual", param_group["residual"], RESIDUAL_RULES)
        proj = param_group.get("projectable")
        if proj is not None:
            check_bool(f"param group {n} projectable", proj)
            if proj:
                for i, p in enumerate(ps):
                    if p.dim() != 2:
                        raise ValueError(f"param group {n} is projectable but its tensor {i} has shape "
                                         f"{tuple(p.shape)}; FRUGAL projects 2-D weights only")
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        g.setdefault("frugal_step", 0)  # steps taken by this group
        g.setdefault("renewal", -1)  # index of the current subspace (-1: none yet)
        g.setdefault("active_blocks", [])  # blockwise: indices (within the projectable tensors) on Adam

    def _projectable(self, group: dict) -> list[Tensor]:
        flag = group.get("projectable")
        if flag is None:
            return [p for p in group["params"] if p.dim() == 2]
        return list(group["params"]) if flag else []

    # ------------------------------------------------------------------ subspaces
    def _renew_blocks(self, group: dict, n: int) -> list[int]:
        return blockwise_active(n, group["rho"], group["renewal"], group["block_order"], group["seed"])

    @staticmethod
    def _world():
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist
        return None

    def _new_subspace(self, p: Tensor, index: int, group: dict) -> Subspace:
        gen = renewal_generator(group["seed"], group["renewal"], index)
        sub = make_subspace(p.grad, group["rho"], group["projection"], gen)
        dist = self._world() if group["sync_subspace"] else None
        if dist is not None and sub.basis is not None:
            dist.broadcast(sub.basis, src=0)
        return sub

    # ------------------------------------------------------------------ Adam pieces
    @staticmethod
    def _fresh_moments(state: dict, like: Tensor) -> None:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)

    @staticmethod
    def _adam_direction(state: dict, grad: Tensor, beta1: float, beta2: float, eps: float
                        ) -> tuple[Tensor, Tensor, float]:
        """Update the moments in place; return (exp_avg, denom, 1 / bias_correction1).
        The operations are torch.optim.AdamW's (single-tensor path), in its order."""
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        denom = (exp_avg_sq.sqrt() / (bias_correction2 ** 0.5)).add_(eps)
        return exp_avg, denom, bias_correction1

    def _adamw_in_place(self, p: Tensor, grad: Tensor, state: dict, lr: float, group: dict) -> None:
        beta1, beta2 = group["betas"]
        exp_avg, denom, bc1 = self._adam_direction(state, grad, beta1, beta2, group["eps"])
        p.addcdiv_(exp_avg, denom, value=-(lr / bc1))

    def _residual_step(self, p: Tensor, r: Tensor, group: dict) -> None:
        rule = group["residual"]
        if rule == "none":
            return
        lr = group["lr"] * group["proj_lr_scale"] * group["residual_lr_scale"]
        if rule == "sgd":
            p.add_(r, alpha=-lr)
        else:
            p.add_(torch.sign(r), alpha=-lr)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            projectable = self._projectable(group)
            pid = {id(p): i for i, p in enumerate(projectable)}
            if group["frugal_step"] % group["update_gap"] == 0:
                group["renewal"] += 1
                if group["projection"] == "blockwise":
                    group["active_blocks"] = self._renew_blocks(group, len(projectable))
            active = set(group["active_blocks"])
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("FRUGAL does not support sparse gradients")
                state = self.state[p]
                if group["weight_decay"] != 0:
                    p.mul_(1 - lr * group["weight_decay"])
                i = pid.get(id(p))
                if i is None:  # AdamW, never reset
                    if "exp_avg" not in state:
                        self._fresh_moments(state, p)
                    self._adamw_in_place(p, grad, state, lr, group)
                    continue
                if group["projection"] == "blockwise":
                    self._blockwise(p, grad, state, i in active, len(active) == len(projectable), group)
                else:
                    self._projected(p, grad, state, i, group)
            group["frugal_step"] += 1
        return loss

    def _blockwise(self, p, grad, state, is_active, all_active, group) -> None:
        renewal = group["renewal"]
        if state.get("renewal") != renewal:
            keep = all_active and state.get("active", False) and "exp_avg" in state
            if not keep:  # a new block set: reset (the official code deactivates, then re-inits, every tensor)
                state.clear()
                if is_active:
                    self._fresh_moments(state, p)
            state["active"] = bool(is_active)
            state["renewal"] = renewal
        if state["active"]:
            self._adamw_in_place(p, grad, state, group["lr"] * group["proj_lr_scale"], group)
        else:
            self._residual_step(p, grad, group)

    def _projected(self, p, grad, state, index, group) -> None:
        renewal = group["renewal"]
        if state.get("renewal") != renewal:
            side, rank, full = side_and_rank(p.shape, group["rho"], group["projection"])
            keep = rank >= full and state.get("subspace", {}).get("full", False) and "exp_avg" in state
            if not keep:
                sub = self._new_subspace(p, index, group)
                state.clear()
                state["subspace"] = sub.to_state()
                if sub.rank > 0:
                    self._fresh_moments(state, sub.down(grad))
            state["renewal"] = renewal
        sub = Subspace.from_state(state["subspace"])
        lr = group["lr"] * group["proj_lr_scale"]
        if sub.full:
            self._adamw_in_place(p, grad, state, lr, group)
            return
        low = None
        if sub.rank > 0:
            beta1, beta2 = group["betas"]
            low = sub.down(grad)
            exp_avg, denom, bc1 = self._adam_direction(state, low, beta1, beta2, group["eps"])
            p.add_(sub.up(exp_avg / denom, p.shape), alpha=-(lr / bc1))
        if group["residual"] != "none":
            self._residual_step(p, sub.residual(grad, low), group)

    # ------------------------------------------------------------------ reporting
    def expected_state_bytes(self, renewal: int = 0) -> dict[str, int]:
        """What :meth:`state_bytes` measures after any step of renewal ``renewal`` (0 = steps
        0..update_gap-1 of a group) when every parameter has a gradient, from the groups, shapes
        and dtypes alone (see :func:`frugal_state_bytes`)."""
        check_int("renewal", renewal, low=0)
        moments = projectors = 0
        for group in self.param_groups:
            projectable = self._projectable(group)
            pid = {id(p): i for i, p in enumerate(projectable)}
            active = set(blockwise_active(len(projectable), group["rho"], renewal, group["block_order"],
                                          group["seed"])) if group["projection"] == "blockwise" else set()
            for p in group["params"]:
                size = p.element_size()
                i = pid.get(id(p))
                if i is None or (group["projection"] == "blockwise" and i in active):
                    moments += 2 * p.numel() * size
                    continue
                if group["projection"] == "blockwise":
                    continue
                side, rank, full = side_and_rank(p.shape, group["rho"], group["projection"])
                if rank >= full:
                    moments += 2 * p.numel() * size
                    continue
                other = p.shape[0] if side == "right" else p.shape[1]  # the low-rank moments are [m, r] / [r, n]
                moments += 2 * rank * other * size
                if group["projection"] in ("svd", "random"):
                    projectors += rank * full * size
                else:  # randperm / randk: an int64 index
                    projectors += rank * 8
        return {"moments": moments, "projectors": projectors, "total": moments + projectors}

    def _adam_projectable(self, renewal: int) -> int:
        """Projectable parameters with full Adam moments in renewal ``renewal`` (blockwise only)."""
        n = 0
        for group in self.param_groups:
            projectable = self._projectable(group)
            if group["projection"] == "blockwise":
                active = blockwise_active(len(projectable), group["rho"], renewal, group["block_order"],
                                          group["seed"])
                n += sum(projectable[i].numel() for i in active)
            else:  # a subspace of full rank is the identity: full moments
                for p in projectable:
                    _, rank, full = side_and_rank(p.shape, group["rho"], group["projection"])
                    n += p.numel() if rank >= full else 0
        return n

    def state_bytes(self) -> dict[str, int]:
        """Measured bytes of the optimizer state: ``moments`` (Adam's exp_avg
        and exp_avg_sq everywhere), ``projectors`` (subspace bases and
        indices), ``total`` (every tensor in the state; equals
        :func:`optimizer_state_bytes`)."""
        moments = projectors = 0
        for s in self.state.values():
            moments += _tensor_bytes(s.get("exp_avg")) + _tensor_bytes(s.get("exp_avg_sq"))
            projectors += _tensor_bytes(s.get("subspace"))
        return {"moments": moments, "projectors": projectors, "total": optimizer_state_bytes(self)}
