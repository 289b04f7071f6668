"""The frozen-feature cache: exact, skips the tower, shared on disk, never stale."""

import pytest
import torch
from transformers import CLIPVisionModel

from meteor.model.feature_cache import FeatureCache, tower_fingerprint
from meteor.testing import tiny_clip_vision_config, tiny_model
from meteor.model.vision import VisionTower


class CallCounter:
    """Counts the views the tower's embedding layer sees (i.e. real encoder work)."""

    def __init__(self, tower: VisionTower):
        self.views = 0
        tower.clip.embeddings.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.views += output.shape[0]


def _tower(seed=0):
    torch.manual_seed(seed)
    return VisionTower.from_model(CLIPVisionModel(tiny_clip_vision_config()))


def _views(n, size=(56, 56), seed=0):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_cached_outputs_are_the_towers_and_repeats_skip_the_tower():
    tower = _tower()
    counter = CallCounter(tower)
    cache = FeatureCache()
    pixels = _views(3)
    expected = tower(pixels)
    counter.views = 0
    first = cache.encode(tower, pixels)
    assert counter.views == 3 and (cache.hits, cache.misses) == (0, 3)
    assert torch.equal(first.patch_tokens, expected.patch_tokens)
    assert torch.equal(first.cls_attention, expected.cls_attention)
    assert first.grid == expected.grid == (4, 4)
    # A batch mixing known and new views encodes only the new one, and keeps the row order.
    mixed = torch.stack([pixels[2], _views(1, seed=5)[0], pixels[0]])
    second = cache.encode(tower, mixed)
    assert counter.views == 4 and (cache.hits, cache.misses) == (2, 4)
    assert torch.equal(second.patch_tokens[0], expected.patch_tokens[2])
    assert torch.equal(second.patch_tokens[2], expected.patch_tokens[0])
    assert torch.equal(second.patch_tokens[1], tower(mixed[1:2]).patch_tokens[0])


def test_disk_cache_is_shared_by_towers_with_the_same_weights_only(tmp_path):
    pixels = _views(2, size=(56, 84))
    tower = _tower(seed=0)
    FeatureCache(tmp_path).encode(tower, pixels)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 2 and not list(tmp_path.rglob("*.partial"))
    same = _tower(seed=0)            # a new object with the same weights: reads the files
    counter = CallCounter(same)
    out = FeatureCache(tmp_path).encode(same, pixels)
    assert counter.views == 0
    assert torch.equal(out.patch_tokens, tower(pixels).patch_tokens)
    other = _tower(seed=1)           # other weights: another fingerprint, nothing reused
    assert tower_fingerprint(other) != tower_fingerprint(tower)
    counter = CallCounter(other)
    out = FeatureCache(tmp_path).encode(other, pixels)
    assert counter.views == 2
    assert torch.equal(out.patch_tokens, other(pixels).patch_tokens)


def test_a_damaged_file_is_recomputed_and_rewritten(tmp_path):
    tower = _tower()
    pixels = _views(1)
    FeatureCache(tmp_path).encode(tower, pixels)
    (path,) = list(tmp_path.rglob("*.safetensors"))
    path.write_bytes(b"not a safetensors file")
    counter = CallCounter(tower)
    out = FeatureCache(tmp_path).encode(tower, pixels)
    assert counter.views == 1
    assert torch.equal(out.patch_tokens, tower(pixels).patch_tokens)
    # The file was rewritten whole: a fresh cache reads it back without running the tower.
    counter.views = 0
    reread = FeatureCache(tmp_path).encode(tower, pixels)
    assert counter.views == 0
    assert torch.equal(reread.patch_tokens, out.patch_tokens) and torch.equal(reread.cls_attention, out.cls_attention)


def test_memory_stays_under_its_cap_and_drops_the_least_recently_used():
    tower = _tower()
    counter = CallCounter(tower)
    one_view = sum(t.numel() * t.element_size() for t in (torch.zeros(16, 32), torch.zeros(16)))
    cache = FeatureCache(max_memory_bytes=2 * one_view)
    views = _views(5)
    cache.encode(tower, views)
    assert cache._memory_bytes <= 2 * one_view and len(cache._memory) == 2
    counter.views = 0
    cache.encode(tower, views[3:5])                    # the two newest stayed: no tower work
    assert counter.views == 0 and cache.hits == 2
    cache.encode(tower, views[3:4])                    # touch view 3, so view 4 is now the oldest
    cache.encode(tower, views[0:1])                    # evicted long ago: recomputed, evicts view 4
    assert counter.views == 1
    cache.encode(tower, views[3:4])
    assert counter.views == 1                          # view 3 kept
    cache.encode(tower, views[4:5])
    assert counter.views == 2                          # view 4 dropped
    with pytest.raises(ValueError, match="max_memory_bytes"):
        FeatureCache(max_memory_bytes=-1)


def test_a_file_given_as_the_cache_folder_is_refused_and_kept(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        FeatureCache(path)
    assert path.read_text() == "mine"


def test_model_loss_and_gradients_are_the_same_with_the_cache():
    model, processor = tiny_model(seed=0)
    from PIL import Image

    images = [processor.prepare_image(Image.new("RGB", size, colour))
              for size, colour in (((112, 168), (200, 30, 30)), ((56, 56), (30, 30, 200)))]
    samples = [processor.encode([{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": c}],
                                [image]) for image, c in zip(images, ("red", "blue"))]
    batch = processor.collate(samples, images)
    inputs = batch.to_model_kwargs()
    model.train()
    results = []
    cache = FeatureCache()
    for cached in (False, True, True):      # the trainer's way: the cache's outputs go in as tower_outputs
        towers = cache.encode_views(model.model, inputs["pixel_values"], inputs["view_grids"]) if cached else None
        model.zero_grad()
        loss = model(**inputs, tower_outputs=towers).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.compressor.parameters() if p.grad is not None]
        results.append((loss.detach(), grads))
    assert cache.hits == 8 and cache.misses == 8   # 7 + 1 views, twice
    for loss, grads in results[1:]:
        # Not bitwise: the six slices of a solid image are one view to the cache, so a hit returns
        # the features of one row of the tower's batch for all six, and rows of a batch holding the
        # same pixels differ by ~1e-7 (the matrix products' blocking), as uncached runs' rows do.
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0)
        # Backward itself is not bitwise repeatable here (a run without the cache twice differs by
        # ~1e-7 relative: reduction order), so gradients are compared at a tight tolerance.
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_the_fingerprint_follows_what_the_tower_computes_not_where_it_was_saved(tmp_path):
    from transformers import CLIPVisionModel

    from meteor.model.vision import VisionTower

    torch.manual_seed(0)
    tower = VisionTower.from_model(CLIPVisionModel(tiny_clip_vision_config()))
    tower.save_pretrained(tmp_path / "a")
    tower.save_pretrained(tmp_path / "elsewhere" / "b")
    a, b = VisionTower.from_pretrained(tmp_path / "a"), VisionTower.from_pretrained(tmp_path / "elsewhere" / "b")
    assert tower_fingerprint(a) == tower_fingerprint(b) == tower_fingerprint(tower)
    other_layer = VisionTower.from_pretrained(tmp_path / "a", feature_layer=-1)
    other_expert = VisionTower.from_pretrained(tmp_path / "a", visual_expert="attention_received")
    assert len({tower_fingerprint(t) for t in (a, other_layer, other_expert)}) == 3


def test_a_bfloat16_tower_is_cached_and_float32_keys_are_unchanged():
    # A tower run in bf16 (as training in bf16 does) gets bf16 views, a dtype numpy has no type for.
    import hashlib

    from meteor.model.feature_cache import view_key

    pixels = _views(2)
    low = pixels.to(torch.bfloat16)
    assert view_key(low[0]) == view_key(low[0].clone()) != view_key(low[1])
    assert view_key(low[0]) != view_key(pixels[0])                 # the dtype is part of the key
    # float32 keys hash the same bytes as before (numpy's), so a cache on disk keeps its hits.
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{tuple(pixels[0].shape)}|{pixels.dtype}".encode())
    digest.update(pixels[0].numpy().tobytes())
    assert view_key(pixels[0]) == digest.hexdigest()
    tower = _tower().to(torch.bfloat16)
    cache = FeatureCache()
    first = cache.encode(tower, low)
    again = cache.encode(tower, low)
    assert (cache.hits, cache.misses) == (2, 2)
    assert torch.equal(first.patch_tokens, again.patch_tokens)
