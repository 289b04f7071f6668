"""Every option of LLaVA-Meteor, declared once, typed, documented and validated.

The defaults are those of the paper (docs/design.md lists them); where the paper is silent the
default is stated here with the reason, and nowhere else. ``MeteorConfig`` is serialised to JSON beside the
weights, so a saved model says exactly how it was built.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

# Each set of choices is declared once, as a Literal; validation and the command line read it.
ScanMode = Literal["single", "l2s", "both"]
ExpertMode = Literal["visual", "native", "both"]
DirectionMerge = Literal["mean", "concat"]
NativeGradient = Literal["none", "straight_through"]
Instruction = Literal["learned", "question"]
ProjectorName = Literal["meteor", "mlp", "resampler", "avgpool", "cls_topk", "random_topk"]
"""The vision-to-language projectors (``meteor.model.projectors.PROJECTORS`` holds their classes)."""
VisualExpert = Literal["cls", "attention_received", "pooling_head"]
"""Where the visual expert's scores VS (Eq. 3) come from (``MeteorConfig.visual_expert``)."""
Template = Literal["plain", "vicuna_v1", "chat_template", "auto"]
"""Conversation templates (``meteor.processing.conversation`` renders them): LLaVA's stage-1 ``plain``,
FastChat's ``vicuna_v1``, the tokenizer's own ``chat_template``, or ``auto`` (the tokenizer's own
when it has one, else vicuna_v1)."""

CONFIG_NAME = "meteor_config.json"
"""The file of a MeteorConfig in the folder format before the transformers-native one."""

IGNORE_INDEX = -100
"""Label of positions that are not supervised (transformers' and LLaVA's convention)."""


class ConfigError(ValueError):
    """An impossible or inconsistent option; the message names the field and what to do."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class CompressorConfig:
    """The Top-Down Compression module: Flash Global Fusion, Visual-Native Selection, projector."""

    projector: ProjectorName = "meteor"
    """Which vision-to-language projector: "meteor" (Top-Down Compression, the paper's), or a
    baseline on the same interface: "mlp" (LLaVA-1.5: every token, tokens_per_slice None),
    "resampler" (LLaVA-UHD's compression layer: K learned queries, one cross-attention),
    "avgpool" (adaptive average pooling of the patch grid to K tokens), "cls_topk" (training-free
    Top-K by CLS attention, as FasterVLM / VisionZip's dominant tokens), "random_topk" (K random
    tokens: the floor). All but "meteor" ignore the fusion and selection options."""

    resampler_heads: int = 0
    """Attention heads of the "resampler" projector; 0 means D / 128 (LLaVA-UHD: 40 at D=5120)."""

    vision_width: int = 1024
    """C: width of the vision encoder's patch tokens (CLIP ViT-L/14: 1024)."""

    text_width: int = 5120
    """D: hidden size of the language model (Vicuna-13B: 5120)."""

    tokens_per_slice: int | None = 144
    """K: visual tokens kept per view (paper: 144, 64 or 32). None keeps every token (no selection,
    the LLaVA-1.5 budget)."""

    lam: float = 0.8
    """λ of Eq. 5: weight of the visual expert; the native expert gets 1 − λ."""

    native_warmup: float = 0.3
    """Fraction of the training run over which the native expert's weight ramps linearly from 0
    to 1 − λ (paper: "the first few training epochs"; silent on the length). 0 disables the
    ramp. Outside training the full weight 1 − λ is used."""

    native_temperature: float = 1.0
    """τ in NSⁱ = softmax_i(⟨Fⁱ, INS'⟩ / τ). The paper's Eq. 4 has none: 1.0 reproduces it."""

    native_gradient: NativeGradient = "straight_through"
    """How the selection scores receive gradients. Top-K is not differentiable, so with "none" the
    native expert only learns through the fused tokens Fⁱ. "straight_through" multiplies each kept
    token by (1 + ASⁱ − stopgrad(ASⁱ)): values are unchanged, but the loss can raise or lower the
    scores of the tokens it used (the paper is silent; this is our default)."""

    instruction: Instruction = "learned"
    """The instruction token INS that Flash Global Fusion scans and the native expert scores with
    (Eq. 4). "learned": one learnable token for every image (the paper's; its §1 notes it is not
    conditioned on the prompt). "question" (not in the paper): INS + W·q, where q is the mean of the
    LLM's input embeddings of the question asked about the image (the text between the image and
    the answer) and W a learned D → C map starting at zero, so training starts from the paper's
    model and the native expert can score patches for this question."""

    expert_mode: ExpertMode = "both"
    """Which experts score tokens: "visual" (CLS attention only), "native" (INS' only), "both"."""

    scan_mode: ScanMode = "l2s"
    """Flash Global Fusion sequence: "single" (T¹…T^HW), "l2s" (TL¹,T¹,…,TL^HW,T^HW: the paper's
    default), or "both" (a single and an L2S sequence through the same block, outputs averaged:
    the paper's ≈ +50% compute variant)."""

    window_size: int = 3
    """Side of the local window summarised into TLⁱ (3 in the paper; 5 or 7 for large maps)."""

    fgf_layers: int = 1
    """Number of stacked bidirectional Mamba blocks in Flash Global Fusion (paper silent: 1)."""

    d_state: int = 16
    """N: Mamba state size per channel (Mamba-1 default)."""

    expand: int = 2
    """d_inner = expand · C (Mamba-1 default)."""

    d_conv: int = 4
    """Width of Mamba's causal depthwise convolution (Mamba-1 default)."""

    dt_rank: int | None = None
    """Rank of the Δ projection; None means ceil(C / 16) (Mamba-1 default)."""

    direction_merge: DirectionMerge = "mean"
    """How the forward and backward scans combine before the output projection: "mean" of the
    two, or "concat" (output projection over both; more parameters). Paper silent."""

    projector_hidden: int | None = None
    """Hidden width of the 2-layer GELU MLP to the LLM width; None means D (LLaVA-1.5's
    mlp2x_gelu). The MLP runs after selection: it is token-wise, so this is exact and cheaper."""

    def __post_init__(self) -> None:
        _check(self.vision_width > 0, f"vision_width must be positive, got {self.vision_width}")
        _check(self.text_width > 0, f"text_width must be positive, got {self.text_width}")
        _check(
            self.tokens_per_slice is None or self.tokens_per_slice > 0,
            f"tokens_per_slice (K) must be a positive number of tokens or None (keep all), got "
            f"{self.tokens_per_slice}; the paper uses 144, 64 or 32",
        )
        _check(
            isinstance(self.lam, (int, float)) and 0.0 <= self.lam <= 1.0,
            f"lam (λ) must lie in [0, 1], got {self.lam}; the paper's default is 0.8",
        )
        _check(
            0.0 <= self.native_warmup <= 1.0,
            f"native_warmup is a fraction of training in [0, 1], got {self.native_warmup}",
        )
        _check(
            self.native_temperature > 0 and math.isfinite(self.native_temperature),
            f"native_temperature must be a positive finite number, got {self.native_temperature}",
        )
        _choice("native_gradient", self.native_gradient, get_args(NativeGradient))
        _choice("projector", self.projector, get_args(ProjectorName))
        if self.projector == "mlp":
            _check(self.tokens_per_slice is None,
                   f"the LLaVA-1.5 'mlp' projector keeps every token: set tokens_per_slice to None, "
                   f"not {self.tokens_per_slice}")
        elif self.projector != "meteor":
            _check(self.tokens_per_slice is not None,
                   f"the {self.projector!r} projector keeps K tokens per view: set tokens_per_slice "
                   f"to a positive number (e.g. 144), not None")
        _check(self.resampler_heads >= 0, f"resampler_heads must be ≥ 0, got {self.resampler_heads}")
        _check(
            self.projector != "resampler" or self.text_width % self.resolved_resampler_heads == 0,
            f"the resampler's width D={self.text_width} must be divisible by resampler_heads="
            f"{self.resolved_resampler_heads}",
        )
        _choice("expert_mode", self.expert_mode, get_args(ExpertMode))
        _choice("instruction", self.instruction, get_args(Instruction))
        _check(self.instruction == "learned" or self.projector == "meteor",
               f"instruction={self.instruction!r} conditions Top-Down Compression's instruction token; the "
               f"{self.projector!r} projector has none: use projector='meteor' or instruction='learned'")
        _choice("scan_mode", self.scan_mode, get_args(ScanMode))
        _choice("direction_merge", self.direction_merge, get_args(DirectionMerge))
        _check(
            self.window_size >= 1 and self.window_size % 2 == 1,
            f"window_size must be an odd number ≥ 1 so the window is centred on its token, got "
            f"{self.window_size}; use 3 (paper), 5 or 7",
        )
        _check(self.fgf_layers >= 1, f"fgf_layers must be ≥ 1, got {self.fgf_layers}")
        _check(self.d_state >= 1, f"d_state must be ≥ 1, got {self.d_state}")
        _check(self.expand >= 1, f"expand must be ≥ 1, got {self.expand}")
        _check(self.d_conv >= 1, f"d_conv must be ≥ 1, got {self.d_conv}")
        _check(
            self.dt_rank is None or self.dt_rank >= 1,
            f"dt_rank must be ≥ 1 or None (ceil(C/16)), got {self.dt_rank}",
        )
        _check(
            self.projector_hidden is None or self.projector_hidden >= 1,
            f"projector_hidden must be ≥ 1 or None (= text_width), got {self.projector_hidden}",
        )

    @property
    def d_inner(self) -> int:
        return self.expand * self.vision_width

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.vision_width / 16)

    @property
    def resolved_resampler_heads(self) -> int:
        return self.resampler_heads or max(1, self.text_width // 128)

    @property
    def resolved_projector_hidden(self) -> int:
        return self.projector_hidden if self.projector_hidden is not None else self.text_width


@dataclass
class MeteorConfig:
    """The whole model: which encoder layer feeds the compressor, slicing, and the compressor."""

    compressor: CompressorConfig = field(default_factory=CompressorConfig)

    feature_layer: int = -2
    """Encoder hidden-state layer whose patch tokens are compressed (LLaVA: −2, the penultimate)."""

    attention_layer: int | None = None
    """Layer whose CLS attention gives the visual expert; None = the layer producing the features
    (as FasterVLM; docs/design.md, "Visual expert")."""

    visual_expert: VisualExpert = "cls"
    """What the visual expert VSⁱ (Eq. 3) reads from the frozen tower (``meteor.model.visual_expert``).
    "cls" (the paper's, as FasterVLM): the CLS token's attention to each patch at attention_layer,
    averaged over heads, CLS→CLS excluded, renormalised; needs a CLS token (CLIP). For towers without
    one (SigLIP): "attention_received", the attention each patch receives at attention_layer,
    averaged over every patch query and head (a CLS token, if any, excluded as query and key),
    renormalised; or "pooling_head", the attention of SigLIP's attention-pooling head (its probe) to
    each patch of the last layer after post_layernorm, averaged over heads (needs vision_use_head;
    attention_layer must stay None). Scores sum to 1 per view whichever is chosen."""

    max_slices: int = 6
    """Cap on the number of UHD slices per image (paper: 6, images up to 672×1008)."""

    image_token: str = "<image>"
    """Placeholder the prompt uses for one image; expanded to the visual tokens by the processor."""

    slice_separator: str = ","
    """Text between two slices of a row in LLaVA-UHD's spatial schema."""

    row_separator: str = "\n"
    """Text after each row of slices in LLaVA-UHD's spatial schema."""

    template: Template = "auto"
    """The conversation template the model answers in, used for every prompt built for it (chat,
    serving, evaluation). Instruction tuning (stage 2) records the one it trained with; "auto" picks
    the tokenizer's chat template when it has one, else vicuna_v1."""

    def __post_init__(self) -> None:
        if isinstance(self.compressor, dict):
            self.compressor = CompressorConfig(**_known(CompressorConfig, self.compressor))
        _check(self.max_slices >= 1, f"max_slices must be ≥ 1, got {self.max_slices}")
        _check(self.feature_layer != 0, "feature_layer 0 is the embedding output, not a layer; "
               "use −2 (penultimate, LLaVA) or a positive layer index")
        _check(bool(self.image_token), "image_token must be a non-empty string such as '<image>'")
        _choice("visual_expert", self.visual_expert, get_args(VisualExpert))
        _check(self.visual_expert != "pooling_head" or self.attention_layer is None,
               f"visual_expert='pooling_head' reads the pooling head over the last layer: leave "
               f"attention_layer None, not {self.attention_layer}")
        _choice("template", self.template, get_args(Template))

    def resolve_tokens_per_slice(self, requested: int | None = None, fewest_patches: int | None = None
                                 ) -> int | None:
        """K′, the visual tokens kept per view at inference: ``requested`` when given, else the
        trained K (None: every token). The one place every entry point (processor, model, chat,
        serve, explain, evaluation) resolves it, so all refuse the same impossible values: a K′ for
        a projector that cannot keep another count than it was trained with (the all-tokens MLP,
        the resampler), a K′ that is not a positive integer, or one above ``fewest_patches`` (the
        patches of the smallest view it will be applied to)."""
        compressor = self.compressor
        if requested is None or requested == compressor.tokens_per_slice:
            return compressor.tokens_per_slice
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ConfigError(f"tokens_per_slice (K′) must be a positive number of tokens per view, got {requested!r}")
        if compressor.projector in ("mlp", "resampler"):
            raise ConfigError(f"this model's {compressor.projector!r} projector cannot keep another number of "
                              f"tokens per view than it was trained with ({compressor.tokens_per_slice or 'all'}); "
                              f"leave tokens_per_slice out")
        if fewest_patches is not None and requested > fewest_patches:
            raise ConfigError(f"tokens_per_slice {requested} is more than the {fewest_patches} patches of the "
                              f"smallest view: give at most {fewest_patches}")
        return requested

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MeteorConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a Meteor configuration must be a JSON object, got {type(data).__name__}")
        return cls(**_known(cls, data))

    @classmethod
    def from_json(cls, text: str) -> "MeteorConfig":
        return cls.from_dict(json.loads(text))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "MeteorConfig":
        """The options of a saved model (its config.json, ``model_type`` "llava_meteor"), of a folder in
        the format before 0.2 (meteor_config.json), or of a JSON file of these options."""
        path = Path(folder)
        if path.is_dir():
            path = path / CONFIG_NAME if (path / CONFIG_NAME).is_file() else path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no Meteor configuration at {path.parent}: expected a model folder (config.json) "
                              f"or the format before 0.2 ({CONFIG_NAME})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err})") from err
        if isinstance(data, dict) and "model_type" in data:
            if data["model_type"] != "llava_meteor":
                raise ConfigError(f"{path} describes a {data['model_type']!r} model, not a LLaVA-Meteor one")
            names = {f.name for f in dataclasses.fields(cls)}
            data = {key: value for key, value in data.items() if key in names}
        return cls.from_dict(data)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown keys loudly: a typo in a config file must not silently become a default."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(names)}")
    return dict(data)

