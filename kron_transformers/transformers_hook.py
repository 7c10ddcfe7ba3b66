"""Register the ``"kron"`` quantizer with transformers without importing transformers eagerly.

``import kron_transformers`` stays cheap: it imports neither torch nor transformers. The quantizer
must nevertheless be registered before any ``from_pretrained`` runs, and ``from_pretrained`` lives in
``transformers.modeling_utils``. So the plugin registers itself right after that module is imported:
immediately when it already is, otherwise from a one-shot import hook that runs the registration as
soon as transformers finishes importing it (``kron_transformers.integration.hf_quantizer`` registers
``KronConfig`` and ``KronHfQuantizer`` when it is imported).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from types import ModuleType
from typing import Any


TRIGGER = "transformers.modeling_utils"
INTEGRATION = "kron_transformers.integration.hf_quantizer"


def _register() -> None:
    importlib.import_module(INTEGRATION)


class _LoaderThenRegister(importlib.abc.Loader):
    """Delegates to transformers' own loader, then registers the plugin."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tools that inspect the module
        return getattr(self.loader, name)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers.modeling_utils`` with the other finders and wraps its loader (once)."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != TRIGGER:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = getattr(finder, "find_spec", lambda *args: None)(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _LoaderThenRegister(spec.loader)
                return spec
        return None


def register_with_transformers() -> None:
    """Register now if transformers' model code is loaded, else as soon as it is imported."""
    if TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
