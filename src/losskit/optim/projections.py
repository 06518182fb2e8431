"""Subspaces for FRUGAL's state-full part: how a ``[m, n]`` gradient is split.

A :class:`Subspace` of a matrix gradient ``G`` has ``down(G)`` (the
coordinates Adam sees), ``up(U)`` (back to ``[m, n]``) and
``residual(G) = G - up(down(G))`` (what the state-free rule sees).

* ``svd``: the top-``r`` singular vectors of ``G`` at the renewal step
  (computed in float32, as GaLore/FRUGAL); ``r = round(rho * k)`` where ``k``
  is the dimension of the projected side.
* ``random``: a random orthonormal basis (QR of a Gaussian matrix).
* ``randperm``: ``r`` coordinates along the projected side drawn by a random
  permutation (the official code builds a dense ``k x k`` permutation matrix
  and keeps ``r`` rows of it; an index vector is the same map).
* ``randk``: ``r = round(rho * n)`` random *columns* (input features) of the
  weight, whatever its orientation.

The projected side follows GaLore's ``std`` rule: ``m >= n`` projects from
the right (``G B^T``, ``B`` is ``[r, n]``), otherwise from the left (``A^T G``).
Random draws come from a generator seeded by ``(seed, renewal, parameter
index)``, so every process of a distributed job draws the same subspace
without communicating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PROJECTIONS", "Subspace", "make_subspace", "side_and_rank", "renewal_generator"]

PROJECTIONS = ("blockwise", "svd", "random", "randperm", "randk")


def renewal_generator(seed: int, renewal: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator whose draws depend only on ``(seed, renewal, index)``."""
    mixed = (int(seed) * 1_000_003 + int(renewal) * 10_007 + int(index) * 101 + 12_345) % (2 ** 63 - 1)
    return torch.Generator(device="cpu").manual_seed(mixed)


def side_and_rank(shape: torch.Size | tuple, rho: float, projection: str) -> tuple[str, int, int]:
    """(side, rank, full) for a ``[m, n]`` weight: ``side`` is ``"right"`` or
    ``"left"``, ``full`` the dimension of that side (``rank == full`` means the
    subspace is the whole space)."""
    m, n = int(shape[0]), int(shape[1])
    if projection == "randk":
        return "right", round(n * rho), n
    if m >= n:
        return "right", round(n * rho), n
    return "left", round(m * rho), m


@dataclass
class Subspace:
    """One renewal's subspace of a ``[m, n]`` gradient.

    ``basis`` (orthonormal rows ``[r, n]`` for the right side, columns
    ``[m, r]`` for the left) or ``index`` (selected columns / rows); both
    ``None`` and ``full=True`` is the identity (rank = full dimension).
    """

    side: str
    rank: int
    full: bool
    basis: Tensor | None = None
    index: Tensor | None = None

    def down(self, g: Tensor) -> Tensor:
        if self.full:
            return g
        if self.index is not None:
            return g.index_select(1 if self.side == "right" else 0, self.index)
        if self.side == "right":
            return g @ self.basis.t()
        return self.basis.t() @ g

    def up(self, u: Tensor, shape: torch.Size) -> Tensor:
        if self.full:
            return u
        if self.index is not None:
            out = u.new_zeros(shape)
            out.index_copy_(1 if self.side == "right" else 0, self.index, u)
            return out
        if self.side == "right":
            return u @ self.basis
        return self.basis @ u

    def residual(self, g: Tensor, low: Tensor | None = None) -> Tensor:
        """``g - up(down(g))``; pass ``low = down(g)`` when it is already computed."""
        if self.full:
            return torch.zeros_like(g)
        if self.rank == 0:
            return g
        if self.index is not None:
            out = g.clone()
            out.index_fill_(1 if self.side == "right" else 0, self.index, 0)
            return out
        return g - self.up(self.down(g) if low is None else low, g.shape)

    # -- state_dict form: tensors, ints and bools only (torch's Optimizer.load_state_dict rebuilds every
    # iterable value element by element, which would turn a string into the text of a generator)
    def to_state(self) -> dict:
        return {"right": self.side == "right", "rank": self.rank, "full": self.full, "basis": self.basis,
                "index": self.index}

    @classmethod
    def from_state(cls, d: dict) -> "Subspace":
        idx = d.get("index")  # load_state_dict casts every state tensor to the parameter's dtype
        return cls("right" if d["right"] else "left", int(d["rank"]), bool(d["full"]), d.get("basis"),
                   None if idx is None else idx.long())


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    """``[rows, cols]`` with orthonormal rows (rows <= cols), Haar-distributed."""
    a = torch.randn(cols, rows, generator=gen, dtype=torch.float32)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1
    return (q * d).t().contiguous()


def make_subspace(grad: Tensor, rho: float, projection: str, gen: torch.Generator) -> Subspace:
    """The subspace of ``grad`` (``[m, n]``) for one renewal."""
    side, rank, full = side_and_rank(grad.shape, rho, projection)
    if rank >= full:
        return Subspace(side, full, True)
    dev, dt = grad.device, grad.dtype
    if rank == 0:
        return Subspace(side, 0, False, basis=None,
                        index=torch.zeros(0, dtype=torch.long, device=dev))
    if projection == "svd":
        u, _, vh = torch.linalg.svd(grad.detach().float(), full_matrices=False)
        basis = vh[:rank] if side == "right" else u[:, :rank]
        return Subspace(side, rank, False, basis=basis.to(dt).contiguous())
    if projection == "random":
        b = _orthonormal(rank, full, gen)  # [r, k]
        basis = b if side == "right" else b.t()
        return Subspace(side, rank, False, basis=basis.to(device=dev, dtype=dt).contiguous())
    if projection in ("randperm", "randk"):
        idx = torch.randperm(full, generator=gen)[:rank].sort().values
        return Subspace(side, rank, False, index=idx.to(dev))
    raise ValueError(f"projection: expected one of {PROJECTIONS[1:]}, got {projection!r}")
