"""LLaVA-Meteor: Top-Down Compression of visual tokens for LLaVA-style models.

    from meteor import LlavaMeteor
    model, processor = LlavaMeteor.from_pretrained("path/to/folder")
    batch = processor(["What is written on the sign?"], ["photo.jpg"])
    answer_ids = model.generate(**batch.to_model_kwargs(), max_new_tokens=32)
"""

from .config import CompressorConfig, ConfigError, MeteorConfig

__version__ = "0.1.0"
__all__ = ["CompressorConfig", "ConfigError", "MeteorConfig", "LlavaMeteor", "MeteorProcessor",
           "TopDownCompression", "__version__"]


def __getattr__(name):
    # The heavy modules (transformers) load on first use, so `import meteor` stays cheap.
    if name == "LlavaMeteor":
        from .modeling import LlavaMeteor
        return LlavaMeteor
    if name == "MeteorProcessor":
        from .processor import MeteorProcessor
        return MeteorProcessor
    if name == "TopDownCompression":
        from .projectors import TopDownCompression
        return TopDownCompression
    raise AttributeError(f"module 'meteor' has no attribute {name!r}")
