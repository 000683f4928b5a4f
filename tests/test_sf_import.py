"""SecretFlow's component package is deferred in our processes and still there on demand."""

import subprocess
import sys

CODE = """
import sys
import secfwt_jax.runtime.cluster  # puts the placeholder in place
import secretflow as sf
print("deferred", "secretflow.component.core" not in sys.modules and "s3fs" not in sys.modules)
print("devices", sf.SPU.__name__, sf.PYU.__name__, callable(sf.init))
from secretflow.component.core import Component  # a submodule import loads the real package
print("loaded", sys.modules["secretflow.component"] is sf.component, Component.__name__)
"""


def test_secretflow_imports_without_its_component_package_until_it_is_used():
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines == ["deferred True", "devices SPU PYU True", "loaded True Component"], done.stdout
