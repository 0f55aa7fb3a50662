"""
The low-rank family, the baselines Kronecker factors are compared against:

- LowRankLinear:      W ~ U V with U (out, r), V (r, in), initialised by truncated SVD,
- SharedBasisLinear:  W_l ~ C_l B for a group of layers l sharing one basis B (r, in)
                      (the "Basis Sharing" idea), initialised from the SVD of the
                      group's weights stacked along the output dimension,
- two commands (served by sizes.py, which also finds the rank r whose parameter count
  matches a Kronecker configuration):

    python lowrank.py plan-rank --kron_shape 1536 384       # rank matching a Kronecker size
    python lowrank.py count --compress_targets '[{"pattern": "mlp.*", "layers": "odd", "method": "kron",
                                         "kron_shape": [1536, 384]}]'   # sizes of a setup

Why stack along the output dimension: every member of a group maps the same
kind of input (the residual stream for c_fc and attn.*, the 4*n_embd hidden
for mlp.c_proj), so one basis B projects the input to r features and each layer
keeps its own coefficients C_l (out, r) that read them. Stacking the weights
[W_1; W_2; ...] (G*out, in) = U S V^T gives B = sqrt(S_r) V_r^T and
C_l = (U_r sqrt(S_r)) restricted to member l's rows: the best rank-r
approximation of the stack, so at full rank min(G*out, in) every member is exact.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Truncated SVD

def svd_factors(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) ~ U V, U = U_r sqrt(S_r) (out, r), V = sqrt(S_r) V_r^T (r, in): the
    Frobenius-optimal rank-r approximation (Eckart-Young), sqrt(S) into each factor so
    that the two stay balanced in scale. Ranks above min(out, in) are padded with zeros."""
    work = W if W.dtype == torch.float64 else W.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    Uf, Vf = U[:, :r] * root, root[:, None] * Vh[:r]
    if r < rank:        # more rank than the matrix has: the extra directions start at zero
        Uf = F.pad(Uf, (0, rank - r))
        Vf = F.pad(Vf, (0, 0, 0, rank - r))
    return Uf.to(W.dtype), Vf.to(W.dtype)


@torch.no_grad()
def rescale_to_std(W: torch.Tensor, std: float, *factors: torch.Tensor) -> None:
    """Scale two factors alike so that their product W gets exactly standard deviation `std`
    (the realised spread of a product of random factors varies around its expectation)."""
    if W.device.type != "meta" and W.std() > 0:
        root = (std / W.std()).sqrt()
        for f in factors:
            f.mul_(root)


class LowRankLinear(nn.Module):
    """y = x W^T + b with W = U V, applied as two thin GEMMs (x V^T) U^T.

    Parameters: U (out, r), V (r, in), optional bias (out,)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        if rank is None or rank < 1:
            raise ValueError(f"low-rank layers need a rank >= 1 (lowrank_rank), got {rank!r}; "
                             "see `python lowrank.py plan-rank` for the rank matching a Kronecker size")
        self.in_features, self.out_features, self.rank = in_features, out_features, int(rank)
        self.U = nn.Parameter(torch.empty(out_features, self.rank))
        self.V = nn.Parameter(torch.empty(self.rank, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.init_random(0.02)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"

    def materialize(self) -> torch.Tensor:
        """The dense weight U V, shape (out, in)."""
        return self.U @ self.V

    @torch.no_grad()
    def init_random(self, std: float = 0.02) -> None:
        """Random factors whose product U V has entries of standard deviation `std`: each entry sums
        r products of independent normals, so U and V each get (std^2 / r)^(1/4)."""
        factor_std = (std ** 2 / self.rank) ** 0.25
        nn.init.normal_(self.U, std=factor_std)
        nn.init.normal_(self.V, std=factor_std)
        rescale_to_std(self.materialize(), std, self.U, self.V)

    def macs_per_row(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    @torch.no_grad()
    def init_from_weight(self, W: torch.Tensor) -> None:
        """Truncated SVD of W (out, in)."""
        if tuple(W.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(W.shape)} does not fit LowRankLinear "
                             f"(out={self.out_features}, in={self.in_features})")
        U, V = svd_factors(W, self.rank)
        self.U.copy_(U)
        self.V.copy_(V)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        layer.to(device=linear.weight.device, dtype=linear.weight.dtype)
        layer.init_from_weight(linear.weight.detach())
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer


class SharedBasisLinear(nn.Module):
    """y = (x B^T) C^T + b: a basis B (r, in), possibly the same tensor in several
    layers (tie_bases), and this layer's own coefficients C (out, r)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        if rank is None or rank < 1:
            raise ValueError(f"shared-basis layers need a basis size >= 1 (lowrank_rank), got {rank!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, int(rank)
        self.basis = nn.Parameter(torch.empty(self.rank, in_features))
        self.coefficient = nn.Parameter(torch.empty(out_features, self.rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.init_random(0.02)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, basis={self.rank}, out={self.out_features}, bias={self.bias is not None}"

    def materialize(self) -> torch.Tensor:
        """The dense weight C B, shape (out, in)."""
        return self.coefficient @ self.basis

    @torch.no_grad()
    def init_random(self, std: float = 0.02) -> None:
        """Random basis and coefficients whose product has entries of standard deviation `std`
        (as LowRankLinear.init_random); a shared basis is drawn again by every member."""
        factor_std = (std ** 2 / self.rank) ** 0.25
        nn.init.normal_(self.basis, std=factor_std)
        nn.init.normal_(self.coefficient, std=factor_std)
        rescale_to_std(self.materialize(), std, self.basis, self.coefficient)

    def macs_per_row(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.basis), self.coefficient, self.bias)


def tie_bases(members: list[SharedBasisLinear]) -> None:
    """Make every member use the first one's basis tensor (like weight tying: the
    state dict lists it under each name, parameters() and num_params count it once)."""
    for m in members[1:]:
        if (m.rank, m.in_features) != (members[0].rank, members[0].in_features):
            raise ValueError("layers sharing a basis need the same rank and input size, got "
                             f"{(members[0].rank, members[0].in_features)} and {(m.rank, m.in_features)}")
        m.basis = members[0].basis


@torch.no_grad()
def init_shared_group(members: list[SharedBasisLinear], weights: list[torch.Tensor]) -> None:
    """SVD of the group's weights stacked along the output dimension (G*out, in):
    the shared basis is sqrt(S_r) V_r^T, each member's coefficients its rows of U_r sqrt(S_r)."""
    if len({id(m.basis) for m in members}) != 1:
        raise ValueError("init_shared_group: the members do not share one basis; call tie_bases first")
    stacked = torch.cat([w.detach() for w in weights], dim=0)          # (sum of out, in)
    C, B = svd_factors(stacked, members[0].rank)                        # (sum of out, r), (r, in)
    members[0].basis.copy_(B)
    for m, c in zip(members, C.split([w.shape[0] for w in weights], dim=0)):
        m.coefficient.copy_(c)


if __name__ == "__main__":
    # `python lowrank.py plan-rank|count ...` are the planner's commands (sizes.py, a script above this layer)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sizes.py")
    os.execv(sys.executable, [sys.executable, script, *sys.argv[1:]])
