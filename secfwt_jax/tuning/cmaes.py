"""CMA-ES over the BBT / SecFwT random-subspace prompt, using Hansen's `cma` package.

The data owner runs the ask/tell loop in plaintext. Each generation's candidates z_1..P
are stacked and scored by ONE batched forward (`evaluate_population`, a vmap over the
population axis): under MPC that is one set of communication rounds per generation.

Leakage, by design (as in the paper): the candidates are public inputs to the MPC program
(every compute party sees them) and their losses are revealed to the data owner, who needs
them to rank candidates. The losses are aggregate scores of a batch, not per-example
outputs; nothing else is revealed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import numpy as np

with warnings.catch_warnings():
    # cma tries matplotlib for its optional plotting and warns when it is absent.
    warnings.filterwarnings("ignore", message="Could not import matplotlib")
    import cma


@dataclasses.dataclass(frozen=True)
class CmaConfig:
    """BBT defaults: population 20, sigma0 1.0 (in z units), 8000 forwards budget."""

    population: int = 20
    sigma0: float = 1.0
    generations: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.population < 2:
            raise ValueError("cma.population: must be >= 2")
        if not self.sigma0 > 0:
            raise ValueError("cma.sigma0: must be positive")
        if self.generations < 1:
            raise ValueError("cma.generations: must be >= 1")


def _options(cfg: CmaConfig) -> dict:
    """pycma options. Step size by cumulative step-size adaptation (CSA) in every dimension:
    pycma 4.x switches to two-point adaptation (TPA) in high dimensions (d = 500 here),
    which tests the objective along the last mean shift. A prompt behind a normalisation
    (RMSNorm, LayerNorm) makes the loss depend on the direction of z only; after the first
    generations the mean shift is radial and changes nothing, so TPA halved sigma every
    ~10 generations (1.0 -> 0.015 in 60 on SmolLM2's deep prompt, dev loss flat) where CSA
    keeps it (0.79, dev loss 0.760 -> 0.726; docs/llm.md)."""
    return {
        "popsize": cfg.population, "seed": cfg.seed + 1, "verbose": -9,
        "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
    }  # fmt: skip


@dataclasses.dataclass
class CmaResult:
    best_z: np.ndarray  # the lowest-loss candidate seen (biased under minibatch noise)
    best_loss: float
    history: list[dict]  # per generation: mean / min loss, sigma
    mean_z: np.ndarray  # the distribution mean: the answer (see `solution`)


PopulationLoss = Callable[[np.ndarray, int], np.ndarray]  # ([P, d], generation) -> [P]


def cma_search(
    population_loss: PopulationLoss,
    dim: int,
    cfg: CmaConfig,
    x0: np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
) -> CmaResult:
    """Minimise `population_loss` over z in R^dim with CMA-ES ask/tell."""
    x0 = np.zeros(dim) if x0 is None else np.asarray(x0, np.float64)
    es = cma.CMAEvolutionStrategy(x0, cfg.sigma0, _options(cfg) | {"maxiter": cfg.generations})
    history = []
    for generation in range(cfg.generations):
        candidates = np.asarray(es.ask(), np.float32)
        losses = np.asarray(population_loss(candidates, generation), np.float64)
        es.tell(list(candidates.astype(np.float64)), list(losses))
        history.append(
            {
                "generation": generation,
                "mean_loss": float(losses.mean()),
                "min_loss": float(losses.min()),
                "sigma": float(es.sigma),
            }
        )
        if log:
            log(f"cma gen {generation}: min {losses.min():.4f} mean {losses.mean():.4f}")
    best = es.result
    return CmaResult(
        np.asarray(best.xbest, np.float32), float(best.fbest), history,
        np.asarray(best.xfavorite, np.float32),
    )  # fmt: skip


# The ask/tell steps one at a time, for a driver that interleaves them with MPC runs (the data
# owner's side of `secfwt finetune` with method "cma", and its plaintext reference).
def start_strategy(dim: int, cfg: CmaConfig) -> cma.CMAEvolutionStrategy:
    """A CMA-ES state over z in R^dim from the origin (the same options as `cma_search`)."""
    return cma.CMAEvolutionStrategy(np.zeros(dim), cfg.sigma0, _options(cfg))


def ask(es: cma.CMAEvolutionStrategy) -> np.ndarray:
    """The next generation's candidates [P, dim] (float32: they become public inputs)."""
    return np.asarray(es.ask(), np.float32)


def tell(es: cma.CMAEvolutionStrategy, candidates, losses) -> cma.CMAEvolutionStrategy:
    es.tell(list(np.asarray(candidates, np.float64)), list(np.asarray(losses, np.float64)))
    return es


def solution(es: cma.CMAEvolutionStrategy) -> dict:
    """The search's current estimate, the distribution mean (`xfavorite`), as the prompt
    set's trainable tree {'z': [dim]}.

    Not the best candidate seen (`xbest`): each generation is scored on one minibatch, which
    all its candidates share. Ranks within a generation do not depend on that minibatch's
    luck, but the lowest loss ever seen belongs to the easiest minibatch, and `xbest` sticks
    to the candidate that drew it; the mean keeps converging (tests/test_tuning.py).
    The accuracy study (`notebooks/accuracy_study.ipynb`) saw `xbest` stop moving."""
    return {"z": np.asarray(es.result.xfavorite, np.float32)}
