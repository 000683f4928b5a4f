"""A fine-tuning run described once: the run spec and the one builder every entry point uses."""

from secfwt_jax.run.spec import RunSpec, SpecError, load_spec, spec_from_dict

__all__ = ["RunSpec", "SpecError", "load_spec", "spec_from_dict"]
