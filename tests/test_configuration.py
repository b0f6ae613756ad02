import dataclasses
import json
import os
import warnings

import pytest
import torch

from optimum_olica.configuration import CONFIG_NAME, OlicaConfig


def _custom_config() -> OlicaConfig:
    # Every field away from its default, to catch a field lost in a round trip.
    return OlicaConfig(
        ratio=0.33,
        qk_ratio=0.5,
        vo_ratio=0.25,
        ffn_ratio=0.3,
        calibration_source="my_corpus.jsonl",
        num_samples=64,
        sequence_length=256,
        seed=7,
        calibration_rank_ratio=0.05,
        num_calibrated_layers=4,
        ridge_strength=1.5,
        skip_layers=[29, 0, 3],
        statistics_dtype="float32",
    )


def test_defaults():
    config = OlicaConfig()
    assert config.ratio == 0.2
    assert (config.qk_ratio, config.vo_ratio, config.ffn_ratio) == (None, None, None)
    assert config.calibration_source == "austen"
    assert (config.num_samples, config.sequence_length, config.seed) == (128, 128, 0)
    assert (config.calibration_rank_ratio, config.num_calibrated_layers, config.ridge_strength) == (0.03, 0, 0.5)
    assert config.skip_layers == []
    assert config.statistics_dtype == "float64"
    assert config.format_version == OlicaConfig.FORMAT_VERSION == 1
    assert CONFIG_NAME == "olica_config.json"


def test_every_field_has_help():
    for config_field in dataclasses.fields(OlicaConfig):
        assert config_field.metadata.get("help"), f"{config_field.name} has no help"


def test_skip_layers_stored_sorted_and_not_shared():
    assert _custom_config().skip_layers == [0, 3, 29]
    first, second = OlicaConfig(), OlicaConfig()
    first.skip_layers.append(1)
    assert second.skip_layers == []
    assert OlicaConfig(skip_layers=(2, 1)).skip_layers == [1, 2]


def test_ints_given_for_floats_are_stored_as_float():
    config = OlicaConfig(qk_ratio=0, calibration_rank_ratio=1, ridge_strength=2)
    assert isinstance(config.qk_ratio, float) and isinstance(config.ridge_strength, float)


def test_dict_round_trip_is_json_safe():
    config = _custom_config()
    config_dict = config.to_dict()
    assert json.loads(json.dumps(config_dict)) == config_dict
    assert OlicaConfig.from_dict(config_dict) == config
    config_dict["skip_layers"].append(5)  # to_dict returns a copy
    assert config.skip_layers == [0, 3, 29]


def test_json_string_sorted_indent_2():
    text = _custom_config().to_json_string()
    parsed = json.loads(text)
    assert list(parsed) == sorted(parsed)
    assert text == json.dumps(parsed, sort_keys=True, indent=2) + "\n"


def test_json_file_round_trip(tmp_path):
    config = _custom_config()
    path = tmp_path / "recipe.json"
    config.to_json_file(path)
    assert OlicaConfig.from_json_file(path) == config
    assert OlicaConfig.from_pretrained(path) == config  # the file itself


def test_save_pretrained_round_trip(tmp_path):
    config = _custom_config()
    save_directory = tmp_path / "nested" / "out"
    written = config.save_pretrained(save_directory)
    assert written == os.path.join(save_directory, CONFIG_NAME)
    assert os.path.isfile(written)
    assert OlicaConfig.from_pretrained(save_directory) == config
    assert OlicaConfig.from_pretrained(str(save_directory)) == config
    assert OlicaConfig.from_pretrained(written) == config
    assert OlicaConfig.from_pretrained(tmp_path / "nested" / "out") != OlicaConfig()


def test_save_pretrained_refuses_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        OlicaConfig().save_pretrained(path)


def test_from_pretrained_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        OlicaConfig.from_pretrained(tmp_path)  # a directory without the file
    with pytest.raises(FileNotFoundError, match="nope"):
        OlicaConfig.from_pretrained(tmp_path / "nope")


def test_from_json_file_invalid_json(tmp_path):
    path = tmp_path / CONFIG_NAME
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        OlicaConfig.from_pretrained(tmp_path)


def test_unknown_keys_dropped_with_warning():
    config_dict = OlicaConfig(ratio=0.3).to_dict()
    config_dict["future_knob"] = 1
    config_dict["another_one"] = "x"
    with pytest.warns(UserWarning, match=r"another_one.*future_knob"):
        config = OlicaConfig.from_dict(config_dict)
    assert config == OlicaConfig(ratio=0.3)


def test_known_keys_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OlicaConfig.from_dict(_custom_config().to_dict())


# olica_config.json as the versions that kept the run's settings in the recipe wrote it (OlicaConfig(ratio=0.25,
# num_calibrated_layers=1, skip_layers=[2], device="cuda:1", offload_activations=True, streaming=True).to_json_string()
# at commit 0dc17c7).
RECIPE_WITH_RUN_SETTINGS = """{
  "architecture": "olica",
  "calibration_rank_ratio": 0.03,
  "calibration_source": "austen",
  "device": "cuda:1",
  "dimension_multiple": 8,
  "ffn_ratio": null,
  "format_version": 1,
  "num_calibrated_layers": 1,
  "num_samples": 128,
  "offload_activations": true,
  "qk_ratio": null,
  "ratio": 0.25,
  "refit_damping": "auto",
  "ridge_strength": 0.5,
  "seed": 0,
  "self_calibration": 0.0,
  "sequence_length": 128,
  "skip_layers": [
    2
  ],
  "statistics_dtype": "float64",
  "streaming": true,
  "value_decomposition": "fast",
  "vo_ratio": null
}
"""


def test_recipe_saved_with_run_settings_still_loads(tmp_path, caplog):
    """The run settings in a file of an earlier version are dropped, without a warning: they never changed weights."""
    (tmp_path / CONFIG_NAME).write_text(RECIPE_WITH_RUN_SETTINGS)
    expected = OlicaConfig(ratio=0.25, num_calibrated_layers=1, skip_layers=[2], self_calibration=0.0,
                           value_decomposition="fast")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level("INFO", logger="optimum_olica.configuration"):
            assert OlicaConfig.from_pretrained(tmp_path) == expected
        assert OlicaConfig.from_json_file(tmp_path / CONFIG_NAME) == expected
        assert OlicaConfig.from_dict(json.loads(RECIPE_WITH_RUN_SETTINGS)) == expected
    assert "device, offload_activations, streaming" in caplog.text
    # Saved again, the recipe holds no run setting.
    assert not {"device", "offload_activations", "streaming"} & set(json.loads(expected.to_json_string()))


@pytest.mark.parametrize(
    "setting, where",
    [
        ({"device": "cpu"}, r"prune_model\(\.\.\., device=\.\.\.\) or OlicaPruner\.prune\(\.\.\., device="),
        ({"device": torch.device("cpu")}, r"prune_model\(\.\.\., device="),
        ({"offload_activations": True}, r"OlicaPruner\.prune\(\.\.\., offload_activations=True\)"),
        ({"offload_activations": False}, r"prune_model\(\.\.\., offload_activations=True\)"),
        ({"streaming": True}, r"OlicaPruner\.from_pretrained\(path, streaming=True\)"),
    ],
    ids=["device", "torch-device", "offload", "offload-false", "streaming"],
)
def test_run_settings_are_refused_saying_where_they_went(setting, where):
    name = next(iter(setting))
    message = rf"`{name}` is a setting of the run, not of the recipe \(OlicaConfig\): pass it to .*{where}"
    with pytest.raises(TypeError, match=message):
        OlicaConfig(ratio=0.3, **setting)
    with pytest.raises(TypeError, match=message):
        dataclasses.replace(OlicaConfig(), **setting)
    assert name not in {config_field.name for config_field in dataclasses.fields(OlicaConfig)}


def test_missing_keys_take_defaults():
    assert OlicaConfig.from_dict({"ratio": 0.4}) == OlicaConfig(ratio=0.4)


def test_newer_format_version_refused(tmp_path):
    config_dict = OlicaConfig().to_dict()
    config_dict["format_version"] = OlicaConfig.FORMAT_VERSION + 1
    config_dict["knob_from_the_future"] = True
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config_dict))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the version error comes first, not an unknown-key warning
        with pytest.raises(ValueError, match=r"newer optimum-olica.*[Uu]pgrade"):
            OlicaConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, field_name",
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": "0.2"}, "ratio"),
        ({"ratio": True}, "ratio"),
        ({"qk_ratio": 1.0}, "qk_ratio"),
        ({"qk_ratio": -0.01}, "qk_ratio"),
        ({"vo_ratio": 1.5}, "vo_ratio"),
        ({"ffn_ratio": "half"}, "ffn_ratio"),
        ({"calibration_source": ["some text"]}, "calibration_source"),
        ({"calibration_source": ""}, "calibration_source"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 1.0}, "num_samples"),
        ({"sequence_length": 7}, "sequence_length"),
        ({"seed": -1}, "seed"),
        ({"calibration_rank_ratio": 1.01}, "calibration_rank_ratio"),
        ({"calibration_rank_ratio": -0.01}, "calibration_rank_ratio"),
        ({"num_calibrated_layers": -1}, "num_calibrated_layers"),
        ({"ridge_strength": 0.0}, "ridge_strength"),
        ({"ridge_strength": float("inf")}, "ridge_strength"),
        ({"skip_layers": [1, -2]}, "skip_layers"),
        ({"skip_layers": [1, 1]}, "skip_layers"),
        ({"skip_layers": [1.0]}, "skip_layers"),
        ({"skip_layers": 3}, "skip_layers"),
        ({"statistics_dtype": "float16"}, "statistics_dtype"),
        ({"format_version": 0}, "format_version"),
    ],
)
def test_validation_errors_name_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=field_name) as error:
        OlicaConfig(**kwargs)
    bad_value = next(iter(kwargs.values()))
    if not isinstance(bad_value, list) and bad_value != "":
        assert repr(bad_value) in str(error.value)
    # from_dict reports the same errors (e.g. a hand-edited JSON file with a wrong type)
    with pytest.raises(ValueError, match=field_name):
        OlicaConfig.from_dict({**OlicaConfig().to_dict(), **kwargs})


def test_calibrated_layers_need_a_positive_rank():
    with pytest.raises(ValueError, match=r"num_calibrated_layers=6.*calibration_rank_ratio") as error:
        OlicaConfig(num_calibrated_layers=6, calibration_rank_ratio=0.0)
    assert "num_calibrated_layers=0" in str(error.value)  # says how to disable it instead


def test_linear_calibration_can_be_disabled():
    config = OlicaConfig(num_calibrated_layers=0, calibration_rank_ratio=0.0)
    assert config.num_calibrated_layers == 0


def test_boundaries_accepted():
    OlicaConfig(ratio=0.999, qk_ratio=0.0, vo_ratio=0.0, ffn_ratio=0.999, sequence_length=8, calibration_rank_ratio=1.0)


def test_from_dict_rejects_non_dict():
    with pytest.raises(ValueError, match="dict"):
        OlicaConfig.from_dict([("ratio", 0.2)])
