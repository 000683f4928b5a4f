"""Forward-only tuning (SPSA / MeZO, CMA-ES) and the backprop baseline, as pure functions."""

from secfwt_jax.tuning.adaptation import adapt_attention
from secfwt_jax.tuning.cmaes import CmaConfig, cma_search
from secfwt_jax.tuning.loop import (
    evaluate,
    linear_probe,
    train_backprop,
    train_cma_prompt,
    train_spsa,
)
from secfwt_jax.tuning.schedules import ScheduleConfig, make_schedule
from secfwt_jax.tuning.sets import TrainableSpec, TuningProblem, build_problem
from secfwt_jax.tuning.spsa import SpsaConfig, directions, evaluate_population, spsa_step
from secfwt_jax.tuning.spsa_inplace import InplaceSpsaStep, make_inplace_spsa_step

__all__ = [
    "CmaConfig",
    "InplaceSpsaStep",
    "ScheduleConfig",
    "SpsaConfig",
    "TrainableSpec",
    "TuningProblem",
    "adapt_attention",
    "build_problem",
    "cma_search",
    "directions",
    "evaluate",
    "evaluate_population",
    "linear_probe",
    "make_inplace_spsa_step",
    "make_schedule",
    "spsa_step",
    "train_backprop",
    "train_cma_prompt",
    "train_spsa",
]
