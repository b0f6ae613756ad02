"""Streaming mode: weights read from safetensors one layer at a time, the pruned checkpoint written layer by layer."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_olica  # noqa: F401
from optimum_olica.configuration import OlicaConfig
from optimum_olica.pruner import OlicaPruner

from conftest import make_tiny_model

# Exact widths, so that value heads are narrowed too (the default multiple of 8 keeps head_dim 16 whole at 25%).
CONFIG = OlicaConfig(ratio=0.25, num_calibrated_layers=2, calibration_rank_ratio=0.1, dimension_multiple=1)


def calibration_ids() -> torch.Tensor:
    return torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family, trajectory_weight", [("llama_gqa", 0.0), ("qwen3", 0.0), ("llama_gqa", 0.5)])
def test_streaming_matches_in_memory_pruning(family, trajectory_weight, tmp_path):
    config = dataclasses.replace(CONFIG, trajectory_weight=trajectory_weight)
    base = make_tiny_model(family)
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    ids = calibration_ids()
    in_memory = OlicaPruner(make_tiny_model(family)).prune(config, ids, progress=False)

    pruner = OlicaPruner.from_pretrained(tmp_path / "base", streaming=True)
    assert all(p.device.type == "meta" for name, p in pruner.model.named_parameters() if ".layers." in name)
    assert pruner.prune(config, ids, save_directory=tmp_path / "out", progress=False) is None

    files = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"model.safetensors.index.json", "olica_config.json", "olica_report.json", "modeling_olica.py"} <= files
    assert not any(name.startswith(".") for name in files)
    report = json.loads((tmp_path / "out" / "olica_report.json").read_text())
    assert report["streaming"] is True

    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert streamed.num_parameters() == in_memory.num_parameters() == report["parameters_after"]
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids[:2]).logits, in_memory(ids[:2]).logits, atol=1e-5, rtol=0)


def test_streaming_requires_an_output_directory(tmp_path):
    make_tiny_model("llama_gqa").save_pretrained(tmp_path / "base")
    pruner = OlicaPruner.from_pretrained(tmp_path / "base", streaming=True)
    with pytest.raises(ValueError, match="save_directory"):
        pruner.prune(CONFIG, calibration_ids(), progress=False)


def test_streaming_reports_a_truncated_shard_and_leaves_no_output(tmp_path):
    make_tiny_model("llama_gqa").save_pretrained(tmp_path / "base", max_shard_size="40KB")
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    victim = tmp_path / "base" / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    pruner = OlicaPruner.from_pretrained(tmp_path / "base", streaming=True)
    with pytest.raises(OSError, match="truncated or corrupted"):
        pruner.prune(CONFIG, calibration_ids(), save_directory=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
