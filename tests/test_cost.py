"""meteor.bench.cost against hand-computed cases and against torch's FLOP counter on tiny real models.

``torch.utils.flop_counter.FlopCounterMode`` counts matrix products (mm, addmm, bmm, convolutions)
and attention kernels other than the CPU's SDPA; it skips element-wise ops. So the comparisons use
``Cost.matmul_flops`` and eager attention (which computes the whole square, ``causal=False``).
"""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM

from meteor.bench import cost
from meteor.model.configuration import CompressorConfig
from meteor.model.projectors import build_projector
from meteor.model.vision import VisionTower


def _counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _tiny_llama(layers=1, kv_heads=2, attention="eager"):
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=False)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


# --- hand-computed -------------------------------------------------------------------------------------


def test_causal_pairs_are_the_lower_triangle():
    assert cost.causal_pairs(4, 4) == 4 + 3 + 2 + 1
    assert cost.causal_pairs(1, 100) == 100                 # one decode step sees the whole cache
    assert cost.causal_pairs(2, 5) == 4 + 5                 # two new queries after 3 cached keys
    with pytest.raises(ValueError, match="new_tokens"):
        cost.causal_pairs(6, 5)


def test_one_layer_by_hand():
    # D = 8, 2 heads of 4, one KV head (grouped-query attention), FFN 16, a prompt of T = 3.
    shape = cost.LlmShape(hidden=8, heads=2, kv_heads=1, ffn=16, vocab=10, layers=1)
    layer = cost.llm_layer(shape, 3, 3, itemsize=4)
    linear = 2 * 3 * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16)     # q, k, v, o; SwiGLU's three
    attention = 4 * 2 * 4 * (3 * 4 // 2)                              # 4·h·d per pair, 6 causal pairs
    assert layer.matmul_flops == linear + attention
    full = cost.llm_layer(shape, 3, 3, itemsize=4, causal=False)
    assert full.matmul_flops == linear + 4 * 2 * 4 * 9                # the whole square: 9 pairs
    by_name = {op.name: op for op in layer.ops}
    assert by_name["q_proj"].bytes == (3 * 8 + 8 * 8 + 3 * 8) * 4    # input, weight, output once
    assert by_name["attention"].bytes == (2 * 3 * 8 + 2 * 3 * 4) * 4  # Q and O; K and V at one KV head


def test_the_real_models_parameters():
    assert cost.VICUNA_13B.params == 13_015_864_320                   # LLaMA-2-13B
    assert cost.VICUNA_7B.params == 6_738_415_616                     # LLaMA-2-7B
    model = _tiny_llama(layers=2)
    assert cost.LlmShape.from_config(model.config).params == sum(p.numel() for p in model.parameters())


def test_kv_cache_bytes():
    assert cost.kv_cache_bytes(cost.VICUNA_13B, 1064, 2) == 2 * 40 * 1064 * 5120 * 2   # 831 MiB in bf16
    model = _tiny_llama(layers=2)
    with torch.no_grad():
        out = model(torch.randint(0, 300, (1, 11)), use_cache=True)
    stored = sum(t.numel() * t.element_size() for layer in out.cache.layers for t in (layer.keys, layer.values))
    assert stored == cost.kv_cache_bytes(cost.LlmShape.from_config(model.config), 11, 4)


def test_roofline_takes_the_slowest_ceiling_per_op():
    compute_bound = cost.Op("a", flops=100.0, bytes=10.0, kind="matmul")
    memory_bound = cost.Op("b", flops=1.0, bytes=50.0, kind="elementwise")
    stage = cost.Cost((compute_bound, memory_bound))
    plain = cost.Rates.roofline(matmul=10.0, bandwidth=10.0)
    assert stage.seconds(plain) == 10.0 + 5.0
    assert stage.flops == 101 and stage.bytes == 60
    assert stage.scaled(3).flops == 303 and stage.scaled(3).seconds(plain) == 45.0
    with pytest.raises(ValueError, match="positive"):
        cost.Rates.roofline(0, 1)


def test_the_other_ceilings():
    rates = cost.Rates(matmul=100.0, bandwidth=10.0, attention=20.0, matvec=5.0, transcendental=2.0,
                       fresh=1.0, fresh_threshold=8.0)
    assert cost.Op("a", flops=100.0, kind="attention").seconds(rates) == 5.0          # the attention kernel's rate
    assert cost.Op("v", flops=1.0, bytes=10.0, kind="matvec").seconds(rates) == 2.0   # weights streamed at 5 B/s
    assert cost.Op("s", bytes=10.0, transcendentals=6.0).seconds(rates) == 3.0        # exp-bound, not memory-bound
    # first touches of new tensors above the threshold add to the op's time; small ones reuse memory
    assert cost.Op("f", bytes=10.0, outputs=(4.0, 9.0, 9.0)).seconds(rates) == 1.0 + 18.0
    assert cost.Op("f", bytes=10.0, outputs=(9.0,), calls=2).seconds(rates) == 2 * (1.0 + 9.0)
    gpu = cost.Rates(matmul=100.0, bandwidth=10.0)                                    # no page faults there
    assert cost.Op("f", bytes=10.0, outputs=(9.0,)).seconds(gpu) == 1.0


def test_a_cpu_product_packs_its_weight_before_computing():
    # 100 FLOPs at 100/s, plus 20 weight bytes packed at 10 B/s: 1 + 2 s, not max(1, 2)
    cpu = cost.Rates(matmul=100.0, bandwidth=1000.0, pack=10.0)
    product = cost.Op("p", flops=100.0, bytes=30.0, kind="matmul", packed=20.0)
    assert product.seconds(cpu) == 3.0
    assert product.seconds(cost.Rates.roofline(100.0, 1000.0)) == 1.0               # plain roofline: no pass
    assert cost.Op("v", flops=1.0, bytes=30.0, kind="matvec", packed=20.0).seconds(cpu) == 0.03   # streamed
    # the pass does not shrink with the rows: few rows run below the large product's rate
    shape = cost.VICUNA_13B
    short, long = (cost.llm_layer(shape, t, t, 4) for t in (280, 1064))
    rates = cost.Rates(matmul=369e9, bandwidth=26.7e9, pack=32e9)
    rate = {t: c.flops / c.seconds(rates) for t, c in ((280, short), (1064, long))}
    assert rate[280] < rate[1064]
    packed = sum(op.packed * op.calls for op in short.ops if op.kind == "matmul")
    assert packed == shape.params_per_layer * 4 - 2 * shape.hidden * 4               # every weight but the norms


def test_decoding_is_memory_bound_and_reads_every_weight():
    step = cost.llm_decode_token(cost.VICUNA_13B, context=1000, itemsize=2)
    weights = cost.llm_weight_bytes(cost.VICUNA_13B, 2) - 32000 * 5120 * 2   # the embedding table is not read
    assert step.bytes > weights
    # at an H100-like 990 TFLOP/s and 3.35 TB/s, one step's time is its bytes' time
    seconds = step.seconds(cost.Rates.roofline(990e12, 3.35e12))
    assert seconds == pytest.approx(step.bytes / 3.35e12, rel=0.02)


def test_crossover():
    assert cost.decode_crossover(0.1, 1e-5, 0.1) == pytest.approx(1000)
    assert cost.decode_crossover(0.1, 0.0) == float("inf")


# --- against torch's FLOP counter ------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_prefill_matches_the_flop_counter(kv_heads):
    model = _tiny_llama(kv_heads=kv_heads)
    ids = torch.randint(0, 300, (1, 37))
    counted = _counted(lambda: model(ids, logits_to_keep=1))
    shape = cost.LlmShape.from_config(model.config)
    assert cost.llm_prefill(shape, 37, 4, causal=False).matmul_flops == counted


def test_decode_step_matches_the_flop_counter():
    model = _tiny_llama()
    with torch.no_grad():
        cache = model(torch.randint(0, 300, (1, 20)), use_cache=True).cache
    counted = _counted(lambda: model(torch.tensor([[5]]), cache=cache, use_cache=True, logits_to_keep=1))
    shape = cost.LlmShape.from_config(model.config)
    assert cost.llm_decode_token(shape, context=20, itemsize=4).matmul_flops == counted


@pytest.mark.parametrize("stage", [1, 2])
def test_training_matches_the_flop_counter(stage):
    model = _tiny_llama().train()
    model.requires_grad_(stage == 2)
    embeds = torch.randn(1, 23, 64, requires_grad=True)        # the projector's output: always needs a gradient
    labels = torch.randint(0, 300, (1, 23))
    with FlopCounterMode(display=False) as counter:
        model(inputs_embeds=embeds, labels=labels).loss.backward()
    shape = cost.LlmShape.from_config(model.config)
    assert cost.llm_training(shape, 23, 4, stage, causal=False).matmul_flops == counter.get_total_flops()


def test_vision_encoder_matches_the_flop_counter():
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              image_size=56, patch_size=14)
    tower = VisionTower.from_config(config, attn_implementation="eager")
    slices, whole = torch.randn(3, 3, 56, 42), torch.randn(1, 3, 28, 56)
    counted = _counted(lambda: (tower(slices), tower(whole)))
    shape = cost.VisionShape.from_config(config, tower.num_layers_run)
    assert shape.layers_run == 3                                     # feature layer −2: the last one is skipped
    assert cost.vision_encoder(shape, [(4, 3)] * 3 + [(2, 4)], 4).matmul_flops == counted


@pytest.mark.parametrize("projector, k, scan_mode", [
    ("meteor", 5, "l2s"), ("meteor", 5, "single"), ("meteor", 5, "both"), ("mlp", None, "l2s"),
    ("cls_topk", 5, "l2s"), ("random_topk", 5, "l2s"), ("avgpool", 4, "l2s"), ("resampler", 5, "l2s")])
def test_projectors_match_the_flop_counter(projector, k, scan_mode):
    config = CompressorConfig(projector=projector, vision_width=32, text_width=48, tokens_per_slice=k,
                              d_state=8, resampler_heads=4, scan_mode=scan_mode)
    module = build_projector(config).eval()
    tokens, attention = torch.randn(3, 12, 32), torch.softmax(torch.randn(3, 12), dim=-1)
    counted = _counted(lambda: module(tokens, attention, (4, 3)))
    modelled = cost.compression(config, [(4, 3)] * 3, 4)
    if projector == "resampler":
        # its cross-attention runs through the CPU's SDPA, which the counter does not see
        attention_flops = sum(op.flops for op in modelled.ops if op.kind == "attention")
        assert attention_flops == 4 * 48 * (3 * 5 * 12)               # 4·D per (query, key) pair
        assert modelled.matmul_flops - attention_flops == counted
    else:
        assert modelled.matmul_flops == counted


def test_fgf_at_the_paper_shape():
    # PERFORMANCE.md: the scan at 7 views, L = 1153, d_inner 2048, N 16 is ≈ 2.4 GFLOP per direction.
    config = CompressorConfig()
    fusion = cost.flash_global_fusion(config, [(24, 24)] * 7, 4)
    scans = [op for op in fusion.ops if op.kind == "scan"]
    assert sum(op.flops * op.calls for op in scans) == 2 * 9 * 7 * 1153 * 2048 * 16     # both directions
    out_proj = next(op for op in fusion.ops if op.name == "out_proj")
    assert out_proj.flops * out_proj.calls == 2 * 7 * 577 * 2048 * 1024          # only the Tⁱ and INS' positions


def test_inference_counts_the_prompt_and_the_cache():
    config = CompressorConfig(tokens_per_slice=32)
    grids = [(24, 24)] * 6 + [(19, 29)]
    stages = cost.inference(cost.CLIP_VIT_L_336, cost.VICUNA_13B, config, grids, text_tokens=50, separators=6,
                            itemsize=2)
    assert stages.prompt_tokens == 7 * 32 + 6 + 50
    assert stages.kv_cache_bytes == cost.kv_cache_bytes(cost.VICUNA_13B, 280, 2)
    all_tokens = dataclasses.replace(config, projector="mlp", tokens_per_slice=None)
    assert cost.inference(cost.CLIP_VIT_L_336, cost.VICUNA_13B, all_tokens, grids, 50, 6, 2).prompt_tokens == \
        6 * 576 + 19 * 29 + 56
    # fewer tokens, cheaper prefill; the vision tower is the same for every budget
    uhd = cost.inference(cost.CLIP_VIT_L_336, cost.VICUNA_13B, CompressorConfig(projector="resampler"), grids, 50, 6, 2)
    assert stages.prefill.flops < uhd.prefill.flops / 3.5
    assert stages.vision.flops == uhd.vision.flops


def test_training_step_cache_removes_the_encoder():
    config = CompressorConfig(tokens_per_slice=64)
    grids = [(24, 24)] * 7
    args = (cost.CLIP_VIT_L_336, cost.VICUNA_13B, config, grids, 160, 6, 2)
    uncached = cost.training_step(*args, stage=2, cached_features=False)
    cached = cost.training_step(*args, stage=2, cached_features=True)
    encoder = cost.vision_encoder(cost.CLIP_VIT_L_336, grids, 2)
    assert uncached.flops - cached.flops == pytest.approx(encoder.flops)
    stage1 = cost.training_step(*args, stage=1, cached_features=False)
    assert stage1.flops < uncached.flops
    with pytest.raises(ValueError, match="stage"):
        cost.llm_training(cost.VICUNA_13B, 10, 2, stage=3)
