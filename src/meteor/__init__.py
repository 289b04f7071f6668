"""LLaVA-Meteor: Top-Down Compression of visual tokens for LLaVA-style models.

    import meteor                      # registers LLaVA-Meteor with transformers' Auto classes
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained("path/to/folder")
    processor = AutoProcessor.from_pretrained("path/to/folder")
    messages = [{"role": "user", "content": [{"type": "image", "path": "photo.jpg"},
                                             {"type": "text", "text": "What is written on the sign?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    answer_ids = model.generate(**inputs, max_new_tokens=32)

``import meteor`` itself stays cheap: the model code and transformers load on first use.
"""

# Loaded before the import hooks below exist: those hooks use it, and it must not pass through them.
import importlib.machinery
import importlib.util

from meteor.model.configuration import CompressorConfig, ConfigError, MeteorConfig

__version__ = "0.2.0"
__all__ = ["CompressorConfig", "ConfigError", "LlavaMeteorConfig", "LlavaMeteorForConditionalGeneration",
           "LlavaMeteorImageProcessor", "LlavaMeteorProcessor", "MeteorConfig", "TopDownCompression", "build",
           "compress", "load_pretrained", "register_with_transformers", "save_pretrained", "uncompress", "__version__"]

_LAZY = {
    "LlavaMeteorConfig": "meteor.model.configuration_llava_meteor",
    "LlavaMeteorForConditionalGeneration": "meteor.model.modeling",
    "LlavaMeteorProcessor": "meteor.processing.processor",
    "LlavaMeteorImageProcessor": "meteor.processing.image_processor",
    "TopDownCompression": "meteor.model.projectors",
    "build": "meteor.pretrained",
    "load_pretrained": "meteor.pretrained",
    "save_pretrained": "meteor.pretrained",
    "register_with_transformers": "meteor.pretrained",
    "compress": "meteor.adapters.qwen_vl",  # training-free compression of transformers' Qwen2.5-VL / Qwen3-VL
    "uncompress": "meteor.adapters.qwen_vl",
    # the names before 0.2, deprecated (they warn when used)
    "LlavaMeteor": "meteor.adapters.legacy",
    "MeteorProcessor": "meteor.processing.processor",
}


def __getattr__(name):
    # The heavy modules (torch, transformers) load on first use, so `import meteor` stays cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'meteor' has no attribute {name!r}")


class _RegisterWithAutoClasses:
    """Makes transformers' Auto classes know LLaVA-Meteor without ``import meteor`` importing
    transformers: when one of their modules is imported (by whoever imports it first), its entry
    points (``AutoConfig.from_pretrained``, every ``AutoModel*.from_pretrained`` / ``from_config``,
    ``AutoProcessor.from_pretrained``, ``AutoImageProcessor.from_pretrained``) are wrapped to register
    LLaVA-Meteor's classes before their first use (``meteor.pretrained.register_with_transformers``).
    Registering at import time instead would import transformers' model code while transformers is
    still importing it (its model files import the Auto modules half-way through)."""

    ENTRY_POINTS = {
        "transformers.models.auto.configuration_auto": {"AutoConfig": ("from_pretrained", "for_model")},
        "transformers.models.auto.auto_factory": {"_BaseAutoModelClass": ("from_pretrained", "from_config")},
        "transformers.models.auto.processing_auto": {"AutoProcessor": ("from_pretrained",)},
        "transformers.models.auto.image_processing_auto": {"AutoImageProcessor": ("from_pretrained",)},
    }

    def find_spec(self, name, path=None, target=None):
        if name not in self.ENTRY_POINTS:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            _wrap_entry_points(module, self.ENTRY_POINTS[name])

        spec.loader.exec_module = exec_module
        return spec


def _wrap_entry_points(module, entry_points: dict) -> None:
    import functools

    for class_name, methods in entry_points.items():
        owner = getattr(module, class_name, None)
        for method in methods if owner is not None else ():
            function = getattr(owner.__dict__.get(method), "__func__", None)
            if function is None or getattr(function, "_meteor_registers", False):
                continue

            def make(function=function):
                @functools.wraps(function)
                def registering(cls, *args, **kwargs):
                    _register()
                    _refuse_the_format_before(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
                    return function(cls, *args, **kwargs)
                registering._meteor_registers = True
                return classmethod(registering)

            setattr(owner, method, make())


def _refuse_the_format_before(path) -> None:
    """A LLaVA-Meteor folder in the format before 0.2 has no config.json: say so, with the fix,
    instead of transformers' "Unrecognized model"."""
    import os
    from pathlib import Path

    if isinstance(path, (str, os.PathLike)):
        folder = Path(path)
        if (folder / "meteor_config.json").is_file() and not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is in LLaVA-Meteor's format before 0.2 (meteor_config.json): load it "
                                    f"with meteor.pretrained.load_pretrained, or rewrite it as a transformers folder "
                                    f"with `meteor convert --upgrade {folder} --out NEW_FOLDER`")


_registering = False


def _register() -> None:
    global _registering
    if _registering or _pretrained_registered():
        return
    _registering = True
    try:
        from meteor.pretrained import register_with_transformers

        register_with_transformers()
    finally:
        _registering = False


def _pretrained_registered() -> bool:
    import sys

    module = sys.modules.get("meteor.pretrained")
    return module is not None and module._registered


def _arrange_registration() -> None:
    import importlib
    import sys

    finder = _RegisterWithAutoClasses()
    for name, entry_points in finder.ENTRY_POINTS.items():
        if name in sys.modules:
            _wrap_entry_points(importlib.import_module(name), entry_points)
    if not any(isinstance(f, _RegisterWithAutoClasses) for f in sys.meta_path):
        sys.meta_path.insert(0, finder)


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
    "meteor.demo.tiny": "meteor.testing",
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
_arrange_registration()
