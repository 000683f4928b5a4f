"""secfwt-jax: forward-only fine-tuning of transformers under secure multi-party computation.

    import secfwt_jax as sf

    spec = sf.load_spec("configs/tiny.yaml", overrides=["tuning.steps=2"])
    result = sf.finetune(spec)              # the in-process SPU simulator; a typed result

The names below are loaded on first use, so `import secfwt_jax` imports neither JAX's MPC
stack nor SecretFlow, and the pure core (`secfwt_jax.models`, `.tuning`, `.data`, `.run`)
keeps its import rule: the run-level calls live in `secfwt_jax.runtime.api` and are only
reached through this facade (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import Any

#: name -> module that defines it.
_NAMES = {
    # Runs: a spec in, typed results out (runtime/api.py).
    "load_spec": "secfwt_jax.runtime.api",
    "override": "secfwt_jax.runtime.api",
    "finetune": "secfwt_jax.runtime.api",
    "compile_programs": "secfwt_jax.runtime.api",  # (`sf.compile` is the subpackage)
    "profile": "secfwt_jax.runtime.api",
    "FinetuneResult": "secfwt_jax.runtime.api",
    "ClusterResult": "secfwt_jax.runtime.api",
    "RunCost": "secfwt_jax.runtime.api",
    "ProgramCost": "secfwt_jax.runtime.api",
    "CompiledProgram": "secfwt_jax.runtime.api",
    "RunSpec": "secfwt_jax.run.spec",
    "SpecError": "secfwt_jax.run.spec",
    # Your own loop: the pure, jittable forward-only step and the models.
    "spsa_step": "secfwt_jax.tuning.spsa",
    "directions": "secfwt_jax.tuning.spsa",
    "SpsaConfig": "secfwt_jax.tuning.spsa",
    "TrainableSpec": "secfwt_jax.tuning.sets",
    "build_problem": "secfwt_jax.tuning.sets",
    "Classifier": "secfwt_jax.models.classifier",
    "load_pretrained": "secfwt_jax.models.checkpoint",
    # Any JAX function under SPU (the simulator), revealed.
    "mpc_execute": "secfwt_jax.compile.simulator",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'secfwt_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_NAMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES})
