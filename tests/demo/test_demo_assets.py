"""The trained parts the package ships for the demo: each carries the key of the configuration that
made it, the full demo's configuration asks for exactly that key, and the pipeline copies the asset
instead of training it (unless told to rebuild it)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from meteor.demo import full_config
from meteor.demo.pipeline import ASSETS, CachedFolder, Pipeline
from meteor.model.vision import VisionTower


def _pipeline(tmp_path, rebuild=()):
    return Pipeline(tmp_path, full_config(), force=False, log=lambda line: None, rebuild=rebuild)


def test_the_shipped_clip_is_the_one_the_full_demo_asks_for(tmp_path):
    config = full_config()
    key = json.loads((ASSETS["clip"] / "key.json").read_text())
    assert key == _pipeline(tmp_path).clip_key(config.world)
    # a CLIPModel folder the vision tower loads, at the recipe's widths, with trained (not initial) weights
    tower = VisionTower.from_pretrained(ASSETS["clip"])
    assert tower.hidden_size == config.clip.vision_width and tower.image_size == config.clip.image_size
    summary = json.loads((ASSETS["clip"] / "clip_pretrain.json").read_text())
    assert summary["config"]["epochs"] == config.clip.epochs and summary["final_batch_retrieval"] > 0.9


def test_a_fitting_asset_is_copied_and_a_rebuild_or_another_key_is_not(tmp_path):
    key = _pipeline(tmp_path).clip_key(full_config().world)
    folder = CachedFolder(tmp_path / "clip", key, force=False)
    folder.start()
    assert _pipeline(tmp_path)._use_asset("clip", key, folder.folder)
    copied, shipped = load_file(folder.folder / "model.safetensors"), load_file(ASSETS["clip"] / "model.safetensors")
    assert copied.keys() == shipped.keys() and all(torch.equal(copied[k], shipped[k]) for k in shipped)
    assert not (folder.folder / "key.json").exists()          # the step writes its own key when it finishes
    assert not _pipeline(tmp_path, rebuild=("clip",))._use_asset("clip", key, tmp_path)
    assert not _pipeline(tmp_path)._use_asset("clip", {**key, "vocab": 512}, tmp_path)
    with pytest.raises(ValueError, match="cannot rebuild \\['tokenizer'\\]"):
        _pipeline(tmp_path, rebuild=("tokenizer",))
