"""Register the ``"kron"`` quantizer with transformers without importing transformers eagerly.

``import kron_transformers`` stays cheap: it imports neither torch nor transformers. The quantizer
must nevertheless be registered before any ``from_pretrained`` runs, and ``from_pretrained`` lives in
``transformers.modeling_utils``. So the plugin registers itself right after that module is imported:
immediately when it already is, otherwise from an import hook that runs the registration as soon as
transformers finishes importing it, or, when that happens inside another import of transformers or of this
package, as soon as the outermost such import returns (``kron_transformers.integration.hf_quantizer``
registers ``KronConfig`` and ``KronHfQuantizer`` when it is imported).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from types import ModuleType
from typing import Any


TRIGGER = "transformers.modeling_utils"
PACKAGE = "kron_transformers"
INTEGRATION = "kron_transformers.integration.hf_quantizer"


class _Registration:
    """When to register: after ``TRIGGER`` loads, once no module of transformers or of this package is mid-import.

    Registering imports ``INTEGRATION`` and with it ``kron_transformers.training``, whose ``TrainerCallback``
    import pulls in transformers' trainer code and, when ``peft`` is installed, peft, which imports transformers'
    models. Run while ``transformers.modeling_layers`` waits for ``TRIGGER``, or while one of this package's
    modules is half-executed (transformers can load ``TRIGGER`` from inside ``kron_transformers.training``'s own
    import, through the same chain), that would import a half-executed module. So the registration waits until
    the outermost such import returns.
    """

    executing = 0  # modules of transformers or of this package being executed right now (nested imports)
    pending = False  # TRIGGER has loaded; the plugin is not registered yet

    @classmethod
    def run_if_due(cls) -> None:
        if cls.pending and cls.executing == 0:
            cls.pending = False
            _remove_finder()
            _register()


def _register() -> None:
    importlib.import_module(INTEGRATION)


def _watched(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in ("transformers", PACKAGE))


class _LoaderThenRegister(importlib.abc.Loader):
    """Delegates to the module's own loader, counting the imports in progress; registers when due."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self.loader = loader
        self.name = name

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        _Registration.executing += 1
        try:
            self.loader.exec_module(module)
        finally:
            _Registration.executing -= 1
        _Registration.pending |= self.name == TRIGGER
        _Registration.run_if_due()

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ... for tools that inspect modules
        return getattr(self.loader, name)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers' and this package's modules with the other finders and wraps their loaders."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if not _watched(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *args: None)(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _LoaderThenRegister(spec.loader, fullname)
                return spec
        return None


def _remove_finder() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterImport)]


def register_with_transformers() -> None:
    """Register now if transformers' model code is loaded, else as soon as it is imported and no import of
    transformers or of this package is in progress."""
    if TRIGGER in sys.modules:
        _remove_finder()
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
