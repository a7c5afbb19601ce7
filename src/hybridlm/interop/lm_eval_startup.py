"""Registers the `hybridlm` model with lm-evaluation-harness releases that find no plugins (0.4.x).

`lm_eval --model hybridlm` looks the name up in lm-eval's model registry, which 0.4.x fills only from
its own table (`lm_eval.models`). `hybridlm_lm_eval.pth`, installed beside the package, imports this
module when Python starts. It only adds an import finder, so start-up imports neither lm-eval nor
torch. Once `lm_eval.models` has loaded, the finder registers "hybridlm" as a lazy "module:Class"
placeholder; the plugin itself is imported only when that model is asked for. lm-eval releases that
read the "lm_eval.models" entry point (pyproject.toml) skip names already registered, and accept the
same placeholder, so the two routes agree.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # `typing` itself is not loaded at start-up either; type checkers read this as theirs
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType

MODEL_NAME = "hybridlm"
PLUGIN = "hybridlm.interop.lm_eval_plugin:HybridLMEval"
WATCHED_MODULE = "lm_eval.models"


def register() -> None:
    """Add the lazy placeholder unless lm-eval already knows the name (from the entry point). An
    lm-eval whose registry looks different gets a warning, never a failed `import lm_eval.models`."""
    try:
        from lm_eval.api.registry import model_registry

        if MODEL_NAME not in model_registry:
            model_registry.register(MODEL_NAME, target=PLUGIN)
    except Exception as exc:  # noqa: BLE001 - whatever this lm-eval lacks, lm-eval itself must keep working
        import warnings

        warnings.warn(f"hybridlm could not register the lm-eval model {MODEL_NAME!r} with this lm-eval ({exc!r}); "
                      f"import {PLUGIN.split(':')[0]} before evaluating to register it", stacklevel=2)


class _RegisterAfterLoading:
    """The real loader of `lm_eval.models`, plus `register()` once its module has run."""

    def __init__(self, loader: object) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        register()

    def __getattr__(self, name: str) -> object:  # get_source, is_package, resource readers...
        if name == "loader":  # a copy made without __init__ has none: no endless lookup
            raise AttributeError(name)
        return getattr(self.loader, name)


class LmEvalModelsFinder:
    """A meta-path finder that answers only for `lm_eval.models`, with the other finders' spec."""

    searching = False  # a finder that asks importlib in turn must not bring the search back here

    @classmethod
    def find_spec(cls, fullname: str, path: object, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != WATCHED_MODULE or cls.searching:
            return None
        cls.searching = True
        try:
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                spec = find(fullname, path, target) if finder is not cls and find else None
                if spec is not None and spec.loader is not None:
                    spec.loader = _RegisterAfterLoading(spec.loader)
                    return spec
            return None
        finally:
            cls.searching = False


def install() -> None:
    if WATCHED_MODULE in sys.modules:
        register()
    elif LmEvalModelsFinder not in sys.meta_path:
        sys.meta_path.insert(0, LmEvalModelsFinder)


install()
