"""The adversarial perturbation: the Noise Response Method map h(d) and the per-token ascent step."""

from __future__ import annotations

import logging

import torch

from .config import NRM_MAPS

logger = logging.getLogger(__name__)


def nrm_scale(distortion: torch.Tensor, mapping: str = "linear", gamma: float = 1.0) -> torch.Tensor:
    """The Noise Response Method's budget multiplier h(d): `linear` 1 + gamma*d, `exp` exp(gamma*d), `constant` 1.

    Every map is 1 at d = 0 (a clean instruction gets the base budget) and grows with the distortion.
    """
    if mapping == "linear":
        return 1.0 + gamma * distortion
    if mapping == "exp":
        return torch.exp(gamma * distortion)
    if mapping == "constant":
        return torch.ones_like(distortion)
    raise ValueError(f"Unknown NRM map {mapping!r}; expected one of {NRM_MAPS}.")


def anit_perturbation(
    gradient: torch.Tensor,
    mask: torch.Tensor,
    radius: torch.Tensor,
    *,
    init: float,
    eta: float,
    epsilon: float,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta0, delta1): ANIT's random start and its perturbation after one per-token ascent step.

    Args:
        gradient: (batch, length, hidden) gradient of the loss with respect to the input embeddings.
        mask: (batch, length) 1 on the tokens that may move, 0 elsewhere.
        radius: (batch,) the per-example unit of length, `s * h(d_i)` (embedding scale times the NRM multiplier).
        init: the random start's per-token norm, in units of `radius`.
        eta: the ascent step's per-token norm, in units of `radius`.
        epsilon: the radius of the L2 ball the perturbation is projected onto, in units of `radius`.
        noise: (batch, length, hidden) the random directions of the start (standard normal drawn here when None).

    Every perturbed token t of example i gets `delta0_t = init * r_i * u_t / ||u_t||`, then
    `delta1_t = delta0_t + eta * r_i * g_t / ||g_t||` (a token with zero gradient does not step), projected onto the
    L2 ball of radius `epsilon * r_i`. Every length is proportional to `r_i`, so scaling an example's radius scales
    both deltas by exactly that factor.
    """
    mask = mask.unsqueeze(-1).to(gradient.dtype)
    unit = radius.to(gradient.dtype).view(-1, 1, 1)
    if noise is None:
        noise = torch.randn_like(gradient)
    delta0 = init * unit * _unit_rows(noise) * mask
    delta1 = delta0 + eta * unit * _unit_rows(gradient) * mask
    norm = delta1.norm(dim=-1, keepdim=True)
    shrink = (epsilon * unit / norm.clamp(min=torch.finfo(norm.dtype).tiny)).clamp(max=1.0)
    return delta0, delta1 * shrink


def _unit_rows(values: torch.Tensor) -> torch.Tensor:
    """Each last-dimension row divided by its L2 norm (zero rows stay zero)."""
    norm = values.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, values / norm.clamp(min=torch.finfo(norm.dtype).tiny), torch.zeros_like(values))
