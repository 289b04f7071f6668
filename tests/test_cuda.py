"""What only a GPU can check: bf16 on CUDA, SDPA against eager attention, the vision tower's CLS row,
the selective scan's CUDA path, a training step, and the end-to-end benchmark on the device.

Every test here is marked ``cuda`` and skips cleanly on a machine without an NVIDIA GPU (CI runs the
CPU suite). ``benchmarks/gpu_check.sh`` runs them on a GPU machine:

    python -m pytest -q -m cuda tests/test_cuda.py
"""

import json

import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")]

DEVICE = "cuda"


def _image(width, height, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _tiny(dtype=torch.float32, projector="meteor"):
    from meteor.testing import tiny_meteor_config, tiny_model

    config = tiny_meteor_config(projector=projector, tokens_per_slice=None if projector == "mlp" else 4)
    model, processor = tiny_model(config, seed=0)
    return model.to(DEVICE, dtype), processor


def test_bf16_forward_and_generate_on_the_gpu():
    model, processor = _tiny(torch.bfloat16)
    model.eval()
    sliced = processor.prepare_image(_image(112, 168))
    ids, labels = processor.encode([{"from": "human", "value": "<image>\nWhat is it?"},
                                    {"from": "gpt", "value": "a red circle"}], [sliced])
    batch = processor.collate([(ids, labels)], [sliced])
    out = model(**batch.to_model_kwargs())
    assert out.logits.device.type == "cuda" and out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss)
    prompt = processor.prompts(["What is it?"], [_image(112, 168)])
    new = model.generate(prompt.input_ids, prompt.attention_mask, prompt.images, max_new_tokens=4, do_sample=False)
    assert new.shape[0] == 1 and 1 <= new.shape[1] <= 4


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_sdpa_and_eager_attention_give_the_same_tokens_and_cls_row(dtype, tolerance):
    from meteor.testing import tiny_clip_vision_config
    from meteor.model.vision import VisionTower

    torch.manual_seed(0)
    config = tiny_clip_vision_config()
    sdpa = VisionTower.from_config(config, dtype=dtype, attn_implementation="sdpa").to(DEVICE)
    eager = VisionTower.from_config(config, dtype=dtype, attn_implementation="eager").to(DEVICE)
    eager.clip.load_state_dict(sdpa.clip.state_dict())
    pixels = torch.randn(3, 3, 56, 42, device=DEVICE, dtype=dtype)
    a, b = sdpa(pixels), eager(pixels)
    assert a.grid == b.grid == (4, 3)
    torch.testing.assert_close(a.patch_tokens.float(), b.patch_tokens.float(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(a.cls_attention, b.cls_attention, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(a.cls_attention.sum(-1), torch.ones(3, device=DEVICE), atol=1e-5, rtol=0)
    # the CLS row equals the eager encoder's own attention weights (CLS → patches, head mean, renormalised)
    with torch.no_grad():
        hidden = eager.clip(pixel_values=pixels, output_attentions=True, interpolate_pos_encoding=True)
    weights = hidden.attentions[eager.attention_layer - 1].float().mean(1)[:, 0, 1:]
    torch.testing.assert_close(a.cls_attention, weights / weights.sum(-1, keepdim=True), atol=tolerance, rtol=tolerance)


def test_the_selective_scan_on_cuda_equals_the_reference_forward_and_backward():
    from meteor.model.ops import scan_backend, selective_scan, selective_scan_ref

    backend = scan_backend(DEVICE)
    assert backend in ("mamba_ssm-cuda", "torch-loop")
    generator = torch.Generator().manual_seed(0)
    batch, dim, state, length = 2, 32, 16, 130
    inputs = {
        "u": torch.randn(batch, dim, length, generator=generator),
        "delta": torch.randn(batch, dim, length, generator=generator) * 0.5,
        "A": -(torch.rand(dim, state, generator=generator) * 2 + 0.05),
        "B": torch.randn(batch, state, length, generator=generator),
        "C": torch.randn(batch, state, length, generator=generator),
        "D": torch.randn(dim, generator=generator),
        "z": torch.randn(batch, dim, length, generator=generator),
        "delta_bias": torch.randn(dim, generator=generator) * 0.3,
    }
    results = []
    for fn in (selective_scan, selective_scan_ref):
        leaves = {k: v.to(DEVICE).requires_grad_() for k, v in inputs.items()}
        out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
                 delta_bias=leaves["delta_bias"], delta_softplus=True)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        (out * weights).sum().backward()
        results.append((out.detach(), {k: v.grad for k, v in leaves.items()}))
    (fast, fast_grads), (ref, ref_grads) = results
    assert fast.device.type == "cuda"
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    for name in inputs:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=1e-3, rtol=1e-3, msg=name)


def test_flash_global_fusion_bf16_on_cuda_matches_fp32():
    from meteor.model.configuration import CompressorConfig
    from meteor.model.projectors import build_projector

    torch.manual_seed(0)
    config = CompressorConfig(vision_width=64, text_width=96, tokens_per_slice=8, d_state=8)
    full = build_projector(config).to(DEVICE).eval()
    half = build_projector(config).to(DEVICE).eval()
    half.load_state_dict(full.state_dict())
    half.to(torch.bfloat16)
    tokens = torch.randn(3, 48, 64, device=DEVICE)
    attention = torch.softmax(torch.randn(3, 48, device=DEVICE), -1)
    with torch.no_grad():
        a, b = full(tokens, attention, (6, 8)), half(tokens.bfloat16(), attention, (6, 8))
    assert b.tokens.dtype == torch.bfloat16 and torch.isfinite(b.tokens.float()).all()
    torch.testing.assert_close(b.tokens.float(), a.tokens, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_on_the_gpu(dtype):
    model, processor = _tiny(dtype)
    model.train()
    images = [processor.prepare_image(_image(112, 168, 1)), processor.prepare_image(_image(56, 56, 2))]
    conversations = [[{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}],
                     [{"from": "human", "value": "<image>\nShape?"}, {"from": "gpt", "value": "a circle"}]]
    batch = processor.collate([processor.encode(c, [i]) for c, i in zip(conversations, images)], images)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.compressor.fusion.instruction_token.detach().clone()
    losses = []
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch.to_model_kwargs()).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert not torch.equal(before, model.compressor.fusion.instruction_token.detach())
    assert all(p.grad is None for p in model.vision_tower.parameters())
    model.eval()


def test_the_end_to_end_benchmark_runs_on_the_gpu(tmp_path):
    from meteor.bench import e2e as module

    out = tmp_path / "out.json"
    assert module.main(["--quick", "--device", "cuda", "--dtypes", "bf16", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert list(results["inference"]["bf16"]) == list(module.ROW_NAMES)
    assert list(results["training"]) == list(module.TRAIN_ROWS)
