"""Bad input the other test files do not already cover: each gets one clear error, before any work, and no output.

Already covered elsewhere (not repeated here): ratios outside (0, 1) and bad field values (test_configuration), a ratio
too high for the model (test_allocation, test_pipeline), an unsupported architecture, a model without a tokenizer,
a sequence length above max_position_embeddings, an empty ids tensor (test_pipeline), empty, too short or wrongly
typed text sources (test_data), a truncated shard in streaming mode (test_streaming), an olica_config.json of a newer
format version (test_configuration).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import optimum_olica  # noqa: F401
from optimum_olica.configuration import OlicaConfig
from optimum_olica.errors import CalibrationDataError, CheckpointVerificationError, OlicaError
from optimum_olica.pruner import OlicaPruner, prune_model

from conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = OlicaConfig(ratio=0.2)


def calibration_ids() -> torch.Tensor:
    return torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def assert_untouched(model, state: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.zeros(8, 32, dtype=torch.long), "all padding"),  # make_tiny_model's pad_token_id is 0
        (calibration_ids().float(), "integer token ids"),
        (calibration_ids() > 60, "integer token ids"),
        (calibration_ids() + 1000, "outside the model's vocabulary"),
        (calibration_ids() - 50, "outside the model's vocabulary"),
        (calibration_ids()[None], "num_samples, sequence_length"),
        (calibration_ids().tolist(), "must be a torch tensor"),
    ],
    ids=["all-padding", "float", "bool", "foreign-ids", "negative-ids", "3d", "list"],
)
def test_bad_calibration_ids_are_refused_before_any_work(ids, message, tmp_path):
    model = make_tiny_model("llama")
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(CalibrationDataError, match=message):
        prune_model(model, CONFIG, ids, progress=False)
    assert_untouched(model, state)
    if isinstance(ids, torch.Tensor):  # through the pruner too: no output folder appears
        with pytest.raises(CalibrationDataError, match=message):
            OlicaPruner(model).prune(CONFIG, ids, save_directory=tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()


def test_output_path_below_a_file_is_refused_before_pruning(tmp_path):
    (tmp_path / "a-file").write_text("x")
    pruner = OlicaPruner(make_tiny_model("llama"))
    with pytest.raises(NotADirectoryError, match="is a file; choose a directory path"):
        pruner.prune(CONFIG, calibration_ids(), save_directory=tmp_path / "a-file" / "out", progress=False)
    assert pruner.pruned_model is None


def test_non_writable_output_parent_is_refused_before_pruning(tmp_path, monkeypatch):
    # Tests may run as root, for whom chmod does not make a folder read-only: answer the access check as a
    # read-only folder would (the code asks os.access, then tries to write nothing before pruning).
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(read_only) else real_access(path, mode))
    pruner = OlicaPruner(make_tiny_model("llama"))
    with pytest.raises(PermissionError, match="choose a writable output directory"):
        pruner.prune(CONFIG, calibration_ids(), save_directory=read_only / "out", progress=False)
    assert pruner.pruned_model is None
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("damage", ["garbage-header", "missing-shard", "header-only", "broken-index"])
def test_damaged_streaming_input_is_refused_before_any_layer(damage, tmp_path):
    base = tmp_path / "base"
    make_tiny_model("llama_gqa").save_pretrained(base, max_shard_size="40KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    victim = base / index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    if damage == "garbage-header":
        victim.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + victim.read_bytes()[24:])
    elif damage == "missing-shard":
        victim.unlink()
    elif damage == "broken-index":
        victim = base / "model.safetensors.index.json"
        victim.write_text('{"weight_map": ')
    else:
        data = victim.read_bytes()
        victim.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])
    pruner = OlicaPruner.from_pretrained(base, streaming=True)
    with pytest.raises(CheckpointVerificationError, match=victim.name) as error:
        pruner.prune(CONFIG, calibration_ids(), save_directory=tmp_path / "out", progress=False)
    assert "again" in str(error.value)  # the fix: download or save it again
    assert isinstance(error.value, OSError)  # a file problem, for callers catching OSError
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["base"]


def test_streaming_from_pickle_weights_says_to_convert(tmp_path):
    base = tmp_path / "base"
    make_tiny_model("llama").config.save_pretrained(base)
    (base / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    pruner = OlicaPruner.from_pretrained(base, streaming=True)
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        pruner.prune(CONFIG, calibration_ids(), save_directory=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_skip_layers_beyond_the_model_are_refused():
    with pytest.raises(OlicaError, match=r"names layers \[5\] but the model has 3 layers"):
        prune_model(make_tiny_model("llama"), OlicaConfig(skip_layers=[0, 5]), calibration_ids(), progress=False)


def test_every_package_error_is_a_value_error():
    """``except ValueError`` code written before the package's error types keeps catching them."""
    from optimum_olica import errors
    from optimum_olica.allocation import RatioTooHighError
    from optimum_olica.conversion import UnsupportedArchitectureError

    for error_type in [*(getattr(errors, name) for name in errors.__all__), RatioTooHighError,
                       UnsupportedArchitectureError]:
        assert issubclass(error_type, errors.OlicaError) and issubclass(error_type, ValueError), error_type
