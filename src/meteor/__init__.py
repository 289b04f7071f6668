"""LLaVA-Meteor: Top-Down Compression of visual tokens for LLaVA-style models.

    from meteor import LlavaMeteor
    model, processor = LlavaMeteor.from_pretrained("path/to/folder")
    batch = processor(["What is written on the sign?"], ["photo.jpg"])
    answer_ids = model.generate(**batch.to_model_kwargs(), max_new_tokens=32)
"""

from meteor.model.configuration import CompressorConfig, ConfigError, MeteorConfig

__version__ = "0.1.0"
__all__ = ["CompressorConfig", "ConfigError", "MeteorConfig", "LlavaMeteor", "MeteorProcessor",
           "TopDownCompression", "__version__"]


def __getattr__(name):
    # The heavy modules (transformers) load on first use, so `import meteor` stays cheap.
    if name == "LlavaMeteor":
        from meteor.model.modeling import LlavaMeteor
        return LlavaMeteor
    if name == "MeteorProcessor":
        from meteor.processing.processor import MeteorProcessor
        return MeteorProcessor
    if name == "TopDownCompression":
        from meteor.model.projectors import TopDownCompression
        return TopDownCompression
    raise AttributeError(f"module 'meteor' has no attribute {name!r}")


# Modules that moved when the package was regrouped by architecture: their old names still import
# (the same module object, so patches and isinstance checks agree), with a DeprecationWarning that
# names the new place. Kept for at least one release.
MOVED = {
    "meteor.config": "meteor.model.configuration",
    "meteor.modeling": "meteor.model.modeling",
    "meteor.vision": "meteor.model.vision",
    "meteor.visual_expert": "meteor.model.visual_expert",
    "meteor.feature_cache": "meteor.model.feature_cache",
    "meteor.projectors": "meteor.model.projectors",
    "meteor.ops": "meteor.model.ops",
    "meteor.images": "meteor.processing.images",
    "meteor.slicing": "meteor.processing.slicing",
    "meteor.conversation": "meteor.processing.conversation",
    "meteor.processor": "meteor.processing.processor",
    "meteor.data": "meteor.train.data",
    "meteor.evaluation": "meteor.eval",
    "meteor.metrics": "meteor.eval.metrics",
    "meteor.chat": "meteor.serve.chat",
    "meteor.inference": "meteor.serve.streaming",
    "meteor.explain": "meteor.serve.explain",
    "meteor.visualize": "meteor.serve.visualize",
    "meteor.serving": "meteor.serve",
    "meteor.interop": "meteor.adapters.llava",
    "meteor.interop.llava": "meteor.adapters.llava.checkpoint",
    "meteor.integrations": "meteor.adapters",
    "meteor.integrations.lmms_eval": "meteor.adapters.lmms_eval",
    "meteor.cost": "meteor.bench.cost",
}


def _moved_name(name: str) -> str | None:
    """The new name of a module under an old one (``meteor.metrics.vqa`` → ``meteor.eval.metrics.vqa``)."""
    for old in sorted(MOVED, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return MOVED[old] + name[len(old):]
    return None


class _MovedModuleFinder:
    """Imports an old module name as the module now at its new name."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        import importlib.util

        new = _moved_name(name)
        if new is None:
            return None
        return importlib.util.spec_from_loader(name, _MovedModuleFinder(), origin=new)

    def create_module(self, spec):
        import importlib
        import warnings

        new = _moved_name(spec.name)
        warnings.warn(f"{spec.name} moved to {new}: import it from there (the old name goes in a later "
                      f"release)", DeprecationWarning, stacklevel=3)
        module = importlib.import_module(new)
        return module

    def exec_module(self, module):
        pass


def _install_finder() -> None:
    import sys

    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())


_install_finder()
