"""AdamW second moments that the sites share through the global model.

Each site's AdamW divides its steps by its own running mean of squared gradients. Averaged
after a round, such updates weigh every site alike however large its gradients, so the site
that is hardest to fit pulls the model less than it would in pooled training
(``benchmarks/quality_algorithms_6000.md``). With ``training.shared_moments`` the sites' second
moments travel next to the weights as their roots, the gradient RMS per parameter (entries of
the global model named ``optimizer.grad_rms.<parameter>``): averaged like the weights (a
linear mean, so the packed CKKS aggregate carries them too), every site starts each round
from the federation's estimate. Roots, because they sit far above the noise that CKKS adds
(about 1e-8) where squared gradients may not.

The entries live only inside the federation: the job's initial model holds them as zeros
("none yet"), sites split them off what they receive, and the server keeps the network's
weights and the moments in separate files.
"""

from __future__ import annotations

import numpy as np
import torch

#: Name prefix of the shared gradient-RMS entries in a global model.
MOMENTS_PREFIX = "optimizer.grad_rms."


def moment_name(parameter: str) -> str:
    """The global model's entry for a parameter's shared gradient RMS."""
    return MOMENTS_PREFIX + parameter


def split_moments(state: dict) -> tuple[dict, dict]:
    """Separates a global model's network weights from its shared moments.

    Args:
        state: Entries of a global model (any array type).

    Returns:
        ``(weights, moments)``; the moments keep their prefixed names.
    """
    weights = {k: v for k, v in state.items() if not k.startswith(MOMENTS_PREFIX)}
    moments = {k: v for k, v in state.items() if k.startswith(MOMENTS_PREFIX)}
    return weights, moments


def zero_moments(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Shared-moment entries for ``network``'s parameters, all zero ("none yet")."""
    return {
        moment_name(name): torch.zeros_like(parameter, memory_format=torch.contiguous_format)
        for name, parameter in network.named_parameters()
    }


def moments_problem(network: torch.nn.Module, moments: dict) -> str | None:
    """Why ``moments`` are not second moments of ``network``, or ``None`` when they are.

    Checks names (one per parameter), shapes and finiteness (CKKS noise may leave
    a zero slightly negative: the engine clamps those).
    """
    expected = {moment_name(n): tuple(p.shape) for n, p in network.named_parameters()}
    missing = sorted(expected.keys() - moments.keys())
    unexpected = sorted(moments.keys() - expected.keys())
    if missing or unexpected:
        names = [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]]
        return "shared moments do not match the network (" + "; ".join(names) + ")"
    for name, shape in expected.items():
        values = np.asarray(moments[name])
        if values.shape != shape:
            return f"shared moment {name}: shape {values.shape} instead of {shape}"
        if not np.all(np.isfinite(values)):
            return f"shared moment {name}: non-finite values"
    return None
