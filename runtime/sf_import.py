"""SecretFlow without its ``component`` package until something uses it.

``import secretflow`` runs ``from . import component, ...``, and ``secretflow.component``
(SecretFlow's Kuscia component pipeline: s3fs, aiobotocore, sqlglot, pandas, scipy.stats)
is 8.6 of the 12.9 s that the import takes on this project's 2-core host, in every party
process. No party of ours uses it. :func:`defer_component` puts a placeholder module under
that name before SecretFlow is imported: the package's ``from . import component`` binds
the placeholder, and the first attribute anyone reads from it (``__path__`` included, so
``import secretflow.component.x`` works too) imports the real package in its place.

`runtime/cluster.py` calls it on import, so every party process (`party_main` imports
that module first) and every launcher gets it. Measured (`tests/test_sf_import.py` checks
the behaviour, not the time): ``python -c 'import secretflow'`` 12.9 s; with the
placeholder 4.1 s.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

#: The package deferred: imported by ``secretflow/__init__.py``, used by none of our paths.
COMPONENT = "secretflow.component"


class _DeferredModule(types.ModuleType):
    """Stands in for an unimported module; any attribute read imports the real one."""

    def __getattr__(self, attr: str):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def defer_component() -> bool:
    """Put the placeholder for ``secretflow.component`` in place, unless SecretFlow (or the
    package) is already imported. True when it was put in place."""
    if "secretflow" in sys.modules or COMPONENT in sys.modules:
        return False
    placeholder = _DeferredModule(COMPONENT)
    placeholder.__spec__ = importlib.machinery.ModuleSpec(COMPONENT, None)
    sys.modules[COMPONENT] = placeholder
    return True


__all__ = ["COMPONENT", "defer_component"]
