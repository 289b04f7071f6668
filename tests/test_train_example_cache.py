"""``TrainConfig.example_cache_mb``: records encoded once and reused by later epochs, with the same
training to the bit (tiny configs of the real classes; the data is ``meteor.testing``'s LLaVA-format
file, the format ``meteor train`` reads)."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from meteor.testing import tiny_llava_data, tiny_model
from meteor.pretrained import save_pretrained
from meteor.train import TrainConfig, TrainConfigError, train
from meteor.train.data import LlavaDataset


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("example_cache")
    model, processor = tiny_model(seed=0)
    save_pretrained(root / "base", model, processor)
    return {"base": root / "base", "data": tiny_llava_data(root / "data", 12, seed=1), "images": root / "data"}


def _run(assets, out, **overrides):
    values = dict(stage=2, data=str(assets["data"]), image_folder=str(assets["images"]), model=str(assets["base"]),
                  output_dir=str(out), global_batch_size=4, per_device_batch_size=2, epochs=3, save_every=100,
                  learning_rate=1e-3, seed=3, feature_cache="memory")
    values.update(overrides)
    return train(TrainConfig(**values))


def test_cached_records_train_the_same_weights_and_are_encoded_once(assets, tmp_path, monkeypatch):
    reads = []
    encode = LlavaDataset.encode

    def counted(self, index):
        reads.append(index)
        return encode(self, index)

    monkeypatch.setattr(LlavaDataset, "encode", counted)
    _run(assets, tmp_path / "plain")
    plain_reads, reads[:] = list(reads), []
    _run(assets, tmp_path / "cached", example_cache_mb=64)
    # without the cache every step encodes its records (3 epochs of 12, after one check read);
    # with it each record is encoded once
    assert len(plain_reads) == 1 + 36 and sorted(reads[1:]) == list(range(12))
    weights = lambda run: (run / "model" / "model.safetensors").read_bytes()
    assert weights(tmp_path / "cached") == weights(tmp_path / "plain")


def test_a_cache_too_small_for_a_record_keeps_none_and_still_trains(assets, tmp_path):
    result = _run(assets, tmp_path / "tiny", example_cache_mb=0, epochs=1)
    assert result.steps_done == 3 and not result.interrupted
    assert load_file(tmp_path / "tiny" / "model" / "model.safetensors")


def test_a_negative_cache_size_is_refused_with_the_fix(assets, tmp_path):
    with pytest.raises(TrainConfigError, match="example_cache_mb must be ≥ 0 \\(0: off\\)"):
        TrainConfig(stage=2, data=str(assets["data"]), model=str(assets["base"]), output_dir=str(tmp_path),
                    example_cache_mb=-1)
