import json

import pytest

from meteor.model.configuration import CONFIG_NAME, CompressorConfig, ConfigError, MeteorConfig


def test_defaults_are_the_papers():
    config = MeteorConfig()
    c = config.compressor
    assert (c.vision_width, c.text_width, c.tokens_per_slice, c.lam) == (1024, 5120, 144, 0.8)
    assert (c.scan_mode, c.expert_mode, c.window_size, c.native_temperature) == ("l2s", "both", 3, 1.0)
    assert (config.feature_layer, config.max_slices) == (-2, 6)
    assert c.d_inner == 2048 and c.resolved_dt_rank == 64 and c.resolved_projector_hidden == 5120


def test_json_round_trip(tmp_path):
    config = MeteorConfig(compressor=CompressorConfig(tokens_per_slice=None, lam=0.5, scan_mode="both"),
                          max_slices=9)
    assert MeteorConfig.from_json(config.to_json()) == config
    config.save(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["compressor"]["lam"] == 0.5
    assert MeteorConfig.load(tmp_path) == config


@pytest.mark.parametrize("field, value, words", [
    ("tokens_per_slice", 0, "tokens_per_slice"),
    ("tokens_per_slice", -3, "tokens_per_slice"),
    ("lam", 1.5, "[0, 1]"),
    ("lam", -0.1, "[0, 1]"),
    ("window_size", 4, "odd"),
    ("window_size", 0, "odd"),
    ("scan_mode", "zigzag", "single, l2s, both"),
    ("expert_mode", "oracle", "visual, native, both"),
    ("native_temperature", 0.0, "positive"),
    ("native_warmup", 2.0, "fraction"),
    ("direction_merge", "max", "mean, concat"),
    ("fgf_layers", 0, "fgf_layers"),
])
def test_impossible_options_are_refused_clearly(field, value, words):
    with pytest.raises(ConfigError) as err:
        CompressorConfig(**{field: value})
    assert words in str(err.value) and str(value) in str(err.value)


def test_unknown_keys_and_bad_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="tokens_per_slise"):
        MeteorConfig.from_dict({"compressor": {"tokens_per_slise": 64}})
    with pytest.raises(ConfigError, match="max_slices"):
        MeteorConfig(max_slices=0)
    with pytest.raises(ConfigError, match="no Meteor configuration"):
        MeteorConfig.load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        MeteorConfig.load(tmp_path)
