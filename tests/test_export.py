"""Exact export to the stock architecture (`optimum_olica.export_to_stock`, ``optimum-cli olica export``).

References the code under test cannot share: the conversion functions against entry-by-entry loops and a brute-force
attention written here; the exported folder loaded by plain transformers in a process where optimum_olica cannot be
imported (no trust_remote_code), against the Olica model's own logits and greedy tokens; parameter counts against
a count written here from the shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import optimum_olica  # noqa: F401  (registers the Auto classes)
from optimum_olica import OlicaConfig, OlicaPruner, export_to_stock
from optimum_olica.checkpoint import save_pruned_model
from optimum_olica.commands import main
from optimum_olica.conversion import dense_from_factors, stock_state_dict, zero_pad_heads
from optimum_olica.inspection import OlicaCheckpoint, describe_checkpoint

from conftest import (
    EXPORTABLE_DIMENSIONS,
    TINY_FAMILIES,
    make_tiny_model,
    random_olica_model,
    without_upstream_noise,
)
from oracle_probe import oracle_inputs as probe_inputs  # three prompts, two left-padded
from reload_probe import probe_outputs
from tiny_checkpoint import make_tiny_tokenizer

TESTS = Path(__file__).parent
OPTIMUM_CLI = Path(sys.executable).with_name("optimum-cli")

# The tiny families, and a Qwen2 whose layers mix sliding-window and full attention.
SHAPES = {family: {} for family in TINY_FAMILIES}
SHAPES["qwen2_mixed_windows"] = {"family": "qwen2", "use_sliding_window": True, "max_window_layers": 1,
                                 "sliding_window": 4}


def make_olica_model(shape: str = "llama_gqa", **dimensions):
    """An Olica model with the given dimensions and random weights, biases and norms (std 0.2)."""
    overrides = dict(SHAPES[shape])
    base = make_tiny_model(overrides.pop("family", shape), **overrides)
    return random_olica_model(base.config, **{**EXPORTABLE_DIMENSIONS, **dimensions})


def run_plugin_free_probes(checkpoints: dict[str, Path], directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``reload_probe.py`` on each checkpoint, in one fresh process where optimum_olica cannot be imported, without
    trust_remote_code (one process for all: starting Python with torch and transformers costs seconds)."""
    inputs_path = directory / "probe_in.safetensors"
    save_file(probe_inputs(), inputs_path)
    runs = [[str(checkpoint), str(inputs_path), str(directory / f"{name}.safetensors"), "--block-package"]
            for name, checkpoint in checkpoints.items()]
    script = f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport reload_probe\n" \
        f"for argv in {runs!r}:\n    reload_probe.main(argv)"
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=directory)
    return {name: load_file(directory / f"{name}.safetensors") for name in checkpoints}


def added_parameters(model) -> int:
    """What dense Q/K and padded value heads add, counted from the Olica model's module shapes."""
    added = 0
    for layer in model.model.layers:
        attention = layer.self_attn
        for projection in (attention.q_proj, attention.k_proj):
            if hasattr(projection, "down"):  # factored: (out, rank) + (rank, in) -> (out, in)
                out_features, rank = projection.up.weight.shape
                in_features = projection.down.weight.shape[1]
                added += out_features * in_features - rank * (out_features + in_features)
        missing_channels = attention.head_dim - attention.value_head_dim
        hidden = attention.v_proj.in_features
        rows = attention.num_key_value_heads * missing_channels
        added += rows * hidden + (rows if attention.v_proj.bias is not None else 0)
        added += hidden * attention.num_heads * missing_channels
    return added


# ---- the conversion functions against brute force ------------------------------------------------------------------


def test_dense_from_factors_is_the_product_entry_by_entry():
    generator = torch.Generator().manual_seed(0)
    up, down = torch.randn(5, 3, generator=generator), torch.randn(3, 4, generator=generator)
    dense = dense_from_factors(up, down)
    assert dense.shape == (5, 4) and dense.dtype == torch.float32
    for row in range(5):
        for column in range(4):
            expected = sum(up[row, r].item() * down[r, column].item() for r in range(3))
            assert abs(dense[row, column].item() - expected) < 1e-5


def test_dense_from_factors_rounds_the_exact_product_once_in_low_precision():
    generator = torch.Generator().manual_seed(0)
    up = torch.randn(64, 32, generator=generator).bfloat16()
    down = torch.randn(32, 48, generator=generator).bfloat16()
    exact = up.double() @ down.double()
    dense = dense_from_factors(up, down)
    assert dense.dtype == torch.bfloat16
    # Rounded once: within half a bfloat16 step (2**-8 relative) of the exact product, everywhere.
    assert ((dense.double() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-30).all()


def test_zero_pad_heads_puts_each_head_first_in_its_padded_block():
    g, h, d_v, d_h, d = 2, 4, 3, 5, 7
    generator = torch.Generator().manual_seed(0)
    v_weight, v_bias = torch.randn(g * d_v, d, generator=generator), torch.randn(g * d_v, generator=generator)
    o_weight = torch.randn(d, h * d_v, generator=generator)
    padded_v, padded_bias = zero_pad_heads(v_weight, 0, g, d_v, d_h), zero_pad_heads(v_bias, 0, g, d_v, d_h)
    padded_o = zero_pad_heads(o_weight, 1, h, d_v, d_h)
    assert padded_v.shape == (g * d_h, d) and padded_bias.shape == (g * d_h,) and padded_o.shape == (d, h * d_h)
    for head in range(g):
        for channel in range(d_h):
            row = head * d_h + channel
            if channel < d_v:
                assert torch.equal(padded_v[row], v_weight[head * d_v + channel])
                assert padded_bias[row] == v_bias[head * d_v + channel]
            else:
                assert not padded_v[row].any() and padded_bias[row] == 0
    for head in range(h):
        for channel in range(d_h):
            column = head * d_h + channel
            if channel < d_v:
                assert torch.equal(padded_o[:, column], o_weight[:, head * d_v + channel])
            else:
                assert not padded_o[:, column].any()


def brute_force_attention(queries, keys, values, o_weight, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Causal grouped-query attention of projected ``(seq, heads * width)`` tensors, one head at a time, then
    ``o_proj`` (no RoPE: the export does not touch it)."""
    seq, head_dim = queries.shape[0], queries.shape[1] // num_heads
    value_width = values.shape[1] // num_kv_heads
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    heads = []
    for head in range(num_heads):
        kv = head // (num_heads // num_kv_heads)
        q = queries[:, head * head_dim : (head + 1) * head_dim]
        k = keys[:, kv * head_dim : (kv + 1) * head_dim]
        v = values[:, kv * value_width : (kv + 1) * value_width]
        scores = ((q @ k.T) / head_dim**0.5).masked_fill(future, float("-inf"))
        heads.append(scores.softmax(-1) @ v)
    return torch.cat(heads, dim=-1) @ o_weight.T


def test_dense_q_and_padded_values_give_the_same_attention():
    h, g, d_h, d_v, d, rank = 4, 2, 6, 4, 8, 3
    generator = torch.Generator().manual_seed(0)

    def random(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    x, q_up, q_down, k_weight = random(5, d), random(h * d_h, rank), random(rank, d), random(g * d_h, d)
    v_weight, v_bias, o_weight = random(g * d_v, d), random(g * d_v), random(d, h * d_v)
    keys = x @ k_weight.T
    olica = brute_force_attention((x @ q_down.T) @ q_up.T, keys, x @ v_weight.T + v_bias, o_weight, h, g)
    padded_values = x @ zero_pad_heads(v_weight, 0, g, d_v, d_h).T + zero_pad_heads(v_bias, 0, g, d_v, d_h)
    stock = brute_force_attention(
        x @ dense_from_factors(q_up, q_down).T, keys, padded_values, zero_pad_heads(o_weight, 1, h, d_v, d_h), h, g
    )
    torch.testing.assert_close(stock, olica, rtol=0, atol=1e-12)


def test_stock_state_dict_shares_untouched_tensors_and_leaves_its_input_alone():
    model = make_olica_model("llama_bias")
    state = model.state_dict()
    names_before = set(state)
    stock = stock_state_dict(state, model.config)
    assert set(state) == names_before
    assert "model.layers.1.self_attn.q_proj.down.weight" in state
    assert "model.layers.1.self_attn.q_proj.weight" in stock and "model.layers.1.self_attn.q_proj.bias" in stock
    assert not any(".down." in name or ".up." in name for name in stock)
    assert stock["model.layers.0.mlp.down_proj.weight"] is state["model.layers.0.mlp.down_proj.weight"]
    assert stock["model.layers.0.self_attn.v_proj.weight"] is state["model.layers.0.self_attn.v_proj.weight"]
    assert stock["model.layers.1.self_attn.v_proj.weight"].shape == (2 * 16, 64)
    assert stock["model.layers.2.self_attn.o_proj.weight"].shape == (64, 4 * 16)


# ---- the exported folder against the Olica model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, dict]:
    """Every shape's Olica model saved, exported, and probed in a process without the plugin."""
    directory = tmp_path_factory.mktemp("exports")
    exports = {}
    for shape in SHAPES:
        model = make_olica_model(shape)
        checkpoint = save_pruned_model(model, directory / f"{shape}-olica")
        exports[shape] = {
            "model": model,
            "expected": probe_outputs(model, **probe_inputs()),
            "olica_config": json.loads((checkpoint / "config.json").read_text()),
            "result": export_to_stock(checkpoint, directory / f"{shape}-stock"),
        }
    folders = {shape: export["result"].directory for shape, export in exports.items()}
    outputs = run_plugin_free_probes(folders, directory)
    for shape, export in exports.items():
        export["outputs"] = outputs[shape]
    return exports


@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_loads_without_the_plugin_and_gives_the_same_outputs(exports, shape):
    export = exports[shape]
    model, expected, result, outputs = export["model"], export["expected"], export["result"], export["outputs"]
    assert export["olica_config"]["model_type"].startswith("olica_")
    config = json.loads((result.directory / "config.json").read_text())
    base_config_class = TINY_FAMILIES[SHAPES[shape].get("family", shape)][0]
    assert config["model_type"] == base_config_class.model_type
    assert config["intermediate_size"] == 48
    assert not {"auto_map", "olica_recipe", "query_ranks", "value_head_dims", "intermediate_sizes"} & set(config)
    assert not list(result.directory.glob("*.py"))
    assert outputs["model_class_is_stock"].item() == 1
    for key in ("plain_logits", "padded_logits"):
        torch.testing.assert_close(outputs[key], expected[key], atol=1e-4, rtol=0)
    assert torch.equal(outputs["generated"], expected["generated"])
    assert result.olica_parameters == model.num_parameters()
    assert result.stock_parameters == model.num_parameters() + added_parameters(model) > model.num_parameters()


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory) -> Path:
    """A tiny Llama pruned by the real pipeline (factored Q/K, narrow values, one FFN width), saved with a tokenizer,
    a generation config of its own, the recipe and the report."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model("llama_gqa", vocab_size=len(tokenizer))
    model.generation_config.repetition_penalty = 1.3
    calibration = torch.randint(3, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    directory = tmp_path_factory.mktemp("pruned") / "tiny-olica"
    # Exact widths: at the default multiple of 8, head_dim 16 keeps whole value heads at 20%.
    OlicaPruner(model, tokenizer).prune(
        OlicaConfig(ratio=0.2, refit_damping=0.1, dimension_multiple=1), calibration_dataset=calibration,
        save_directory=directory, progress=False, device="cpu",
    )
    config = json.loads((directory / "config.json").read_text())
    assert min(config["value_head_dims"]) < config["head_dim"], "the fixture must have narrow value heads"
    return directory


def test_export_carries_tokenizer_generation_config_and_provenance(pruned_dir, tmp_path):
    result = export_to_stock(pruned_dir, tmp_path / "stock")
    files = {path.name for path in result.directory.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "olica_config.json",
            "olica_report.json"} <= files
    assert result.has_tokenizer
    assert json.loads((result.directory / "generation_config.json").read_text())["repetition_penalty"] == 1.3
    assert (result.directory / "olica_config.json").read_text() == (pruned_dir / "olica_config.json").read_text()
    report = json.loads((result.directory / "olica_report.json").read_text())
    original = json.loads((pruned_dir / "olica_report.json").read_text())
    assert report.pop("export") == {
        "format": "stock", "architecture": "LlamaForCausalLM", "parameters": result.stock_parameters,
        "olica_parameters": original["parameters_after"],
    }
    assert report == original
    description = describe_checkpoint(OlicaCheckpoint.from_directory(result.directory))
    assert f"exported          to the stock LlamaForCausalLM: {result.stock_parameters:,} parameters" in description

    from transformers import AutoTokenizer

    text = "It is a truth universally acknowledged"
    assert AutoTokenizer.from_pretrained(result.directory)(text)["input_ids"] == (
        AutoTokenizer.from_pretrained(pruned_dir)(text)["input_ids"]
    )


def test_export_of_a_model_in_memory(tmp_path):
    model = make_olica_model("qwen3")
    result = export_to_stock(model, tmp_path / "stock")
    assert not result.has_tokenizer
    stock = AutoModelForCausalLM.from_pretrained(result.directory).eval()
    assert type(stock).__name__ == "Qwen3ForCausalLM"
    inputs = probe_inputs()
    with torch.no_grad():
        torch.testing.assert_close(stock(**inputs).logits, model(**inputs).logits, atol=1e-4, rtol=0)


def test_stock_save_of_an_ffn_only_model_keeps_its_generation_config(tmp_path):
    """The save path for stock-representable models goes through the same conversion (`to_stock_model`)."""
    model = make_olica_model("llama_gqa", query_ranks=[None] * 3, key_ranks=[None] * 3, value_head_dims=[16] * 3)
    model.generation_config.repetition_penalty = 1.3
    checkpoint = save_pruned_model(model, tmp_path / "pruned")
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "llama"
    assert json.loads((checkpoint / "generation_config.json").read_text())["repetition_penalty"] == 1.3


# ---- refusals -------------------------------------------------------------------------------------------------------


@pytest.fixture
def model_loading_forbidden(monkeypatch):
    """Fails the test if the weights are loaded: what config.json can refuse must be refused first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before config.json was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_per_layer_ffn_widths_export_zero_padded_to_the_widest_with_the_same_outputs(tmp_path):
    model = make_olica_model(intermediate_sizes=[48, 24, 40])
    expected = probe_outputs(model, **probe_inputs())
    result = export_to_stock(save_pruned_model(model, tmp_path / "olica"), tmp_path / "stock")
    assert json.loads((result.directory / "config.json").read_text())["intermediate_size"] == 48
    outputs = run_plugin_free_probes({"stock": result.directory}, tmp_path)["stock"]
    assert outputs["model_class_is_stock"].item() == 1
    for key in ("plain_logits", "padded_logits"):
        torch.testing.assert_close(outputs[key], expected[key], atol=1e-4, rtol=0)
    assert torch.equal(outputs["generated"], expected["generated"])
    hidden = model.config.hidden_size
    padding = 3 * hidden * ((48 - 24) + (48 - 40))  # gate and up rows, down columns (no FFN biases here)
    assert not model.config.mlp_bias
    assert result.stock_parameters == model.num_parameters() + added_parameters(model) + padding


def test_a_calibration_branch_is_refused_naming_the_layers(tmp_path, model_loading_forbidden):
    checkpoint = save_pruned_model(make_olica_model(calibration_ranks=[0, 4, 4]), tmp_path / "olica")
    with pytest.raises(ValueError, match=r"layers 1, 2 have a linear-calibration branch"):
        export_to_stock(checkpoint, tmp_path / "stock")
    assert not (tmp_path / "stock").exists()


def test_a_model_in_memory_with_a_calibration_branch_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"layer 1 has a linear-calibration branch"):
        export_to_stock(make_olica_model(calibration_ranks=[0, 4, 0]), tmp_path / "stock")


def test_output_folder_rules(tmp_path):
    checkpoint = save_pruned_model(make_olica_model(), tmp_path / "olica")
    with pytest.raises(FileExistsError, match="is the checkpoint itself"):
        export_to_stock(checkpoint, checkpoint, overwrite=True)
    (tmp_path / "stock").mkdir()
    (tmp_path / "stock" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        export_to_stock(checkpoint, tmp_path / "stock")
    assert (tmp_path / "stock" / "notes.txt").read_text() == "mine"
    export_to_stock(checkpoint, tmp_path / "stock", overwrite=True)
    assert not (tmp_path / "stock" / "notes.txt").exists() and (tmp_path / "stock" / "model.safetensors").exists()


def test_a_hub_id_is_refused_with_how_to_download_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder named like the id here
    with pytest.raises(FileNotFoundError, match=r"'someone/pruned-model' is not a local folder.*hf download"):
        export_to_stock("someone/pruned-model", tmp_path / "stock")


def test_a_stock_checkpoint_is_refused(tmp_path):
    make_tiny_model("llama_gqa").save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="is not an Olica-pruned model .model_type='llama'.*nothing to export"):
        export_to_stock(tmp_path / "dense", tmp_path / "stock")


# ---- the command line ------------------------------------------------------------------------------------------------


def _cli(*argv) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(OPTIMUM_CLI), *map(str, argv)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    result.stderr = without_upstream_noise(result.stderr)
    return result


def test_optimum_cli_export_prints_both_parameter_counts(pruned_dir, tmp_path):
    result = _cli("olica", "export", pruned_dir, tmp_path / "stock", "--format", "stock")
    assert result.returncode == 0, result.stderr
    olica_parameters = json.loads((pruned_dir / "olica_report.json").read_text())["parameters_after"]
    stock_parameters = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").num_parameters()
    assert f"Olica model   {olica_parameters:,} parameters" in result.stdout
    assert f"Stock export  {stock_parameters:,} parameters (+" in result.stdout
    assert f"checkpoint written to {tmp_path / 'stock'}" in result.stdout


def test_cli_refusal_is_one_line_naming_the_layers(tmp_path, capsys):
    checkpoint = save_pruned_model(make_olica_model(calibration_ranks=[0, 4, 4]), tmp_path / "olica")
    capsys.readouterr()  # saving's progress bar
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(checkpoint), str(tmp_path / "stock")])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optimum-cli olica export: error: This pruned model has no exact")
    assert "layers 1, 2 have a linear-calibration branch" in lines[0]


# ---- the stock recipe: pruned for the stock architecture from the start ---------------------------------------------


def test_stock_recipe_saves_the_base_family_at_its_pruned_size(tmp_path):
    """``architecture='stock'`` narrows only the FFN, uniformly, with the refits: the checkpoint is the stock family
    itself, as small as the pruned model, and plain transformers (no plugin, no remote code) computes what the pruner
    returned."""
    tokenizer = make_tiny_tokenizer()
    base = make_tiny_model("llama_gqa", vocab_size=len(tokenizer))
    full_ffn = base.config.intermediate_size
    dense_parameters = base.num_parameters()
    calibration = torch.randint(3, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    pruned = OlicaPruner(base, tokenizer).prune(
        OlicaConfig(ratio=0.2, architecture="stock", refit_damping=0.1),
        calibration_dataset=calibration, save_directory=tmp_path / "stock", progress=False, device="cpu",
    )
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] < full_ffn
    assert not {"auto_map", "query_ranks", "value_head_dims", "intermediate_sizes"} & set(config)
    assert not list((tmp_path / "stock").glob("*.py"))
    saved = json.loads((tmp_path / "stock" / "olica_config.json").read_text())
    assert (saved["architecture"], saved["qk_ratio"], saved["vo_ratio"]) == ("stock", 0.0, 0.0)

    outputs = run_plugin_free_probes({"stock": tmp_path / "stock"}, tmp_path)["stock"]
    expected = probe_outputs(pruned.eval(), **probe_inputs())
    assert outputs["model_class_is_stock"].item() == 1
    for key in ("plain_logits", "padded_logits"):
        torch.testing.assert_close(outputs[key], expected[key], atol=1e-4, rtol=0)
    assert torch.equal(outputs["generated"], expected["generated"])
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock")
    assert stock.num_parameters() == pruned.num_parameters()
    assert abs(1 - stock.num_parameters() / dense_parameters - 0.2) <= 0.005


@pytest.mark.parametrize("conflict", [{"qk_ratio": 0.3}, {"vo_ratio": 0.1}, {"num_calibrated_layers": 2},
                                      {"skip_layers": [0]}])
def test_stock_recipe_refuses_what_the_stock_architecture_cannot_hold(conflict):
    name = next(iter(conflict))
    with pytest.raises(ValueError, match=rf"architecture='stock' prunes only FFN neurons.*{name}="):
        OlicaConfig(ratio=0.2, architecture="stock", **conflict)
    with pytest.raises(ValueError, match=r"`architecture` must be one of \['olica', 'stock'\]"):
        OlicaConfig(architecture="llama")
    assert OlicaConfig(ratio=0.2, architecture="stock", qk_ratio=0.0).vo_ratio == 0.0
