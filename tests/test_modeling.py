"""The pruned architecture: equivalence with the base families, and the three ways back from disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import optimum_olica  # noqa: F401  (registers the Auto classes)
from optimum_olica.checkpoint import save_pruned_model
from optimum_olica.conversion import UnsupportedArchitectureError, build_olica_model, convert_to_olica, olica_config_from
from optimum_olica.modeling import OlicaLowRankLinear

from conftest import TINY_FAMILIES, make_tiny_model, random_olica_model
from oracle_probe import oracle_inputs as probe_inputs  # three prompts, two left-padded
from reload_probe import probe_outputs

PROBE = str(Path(__file__).with_name("reload_probe.py"))
REDUCED_DIMENSIONS = {
    "query_ranks": [None, 10, 24],
    "key_ranks": [6, None, None],
    "value_head_dims": [16, 8, 12],
    "intermediate_sizes": [96, 40, 64],
    "calibration_ranks": [0, 4, 0],
}


def make_reduced_model(family: str, **dimensions):
    """An Olica model with reduced dimensions and random weights (what pruning writes, minus the fit)."""
    return random_olica_model(make_tiny_model(family).config, **{**REDUCED_DIMENSIONS, **dimensions})


def run_probe(checkpoint: Path, tmp_path: Path, *flags: str) -> dict[str, torch.Tensor]:
    inputs_path, outputs_path = tmp_path / "probe_in.safetensors", tmp_path / "probe_out.safetensors"
    save_file(probe_inputs(), inputs_path)
    subprocess.run(
        [sys.executable, PROBE, str(checkpoint), str(inputs_path), str(outputs_path), *flags],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    return load_file(outputs_path)


def assert_same_outputs(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    for key in ("plain_logits", "padded_logits"):
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0)
    assert torch.equal(actual["generated"], expected["generated"])


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_full_dimension_conversion_matches_base_model(tiny_family, attn_implementation):
    base = make_tiny_model(tiny_family)
    base.config._attn_implementation = attn_implementation
    olica = convert_to_olica(base)
    inputs = probe_inputs()
    expected = probe_outputs(base, **inputs)
    assert_same_outputs(probe_outputs(olica, **inputs), expected)
    assert olica.num_parameters() == base.num_parameters() == olica.config.count_parameters()


def test_eager_and_sdpa_agree_on_reduced_dimensions(tiny_family):
    model = make_reduced_model(tiny_family)
    inputs = probe_inputs()
    model.config._attn_implementation = "eager"
    eager = probe_outputs(model, **inputs)
    model.config._attn_implementation = "sdpa"
    assert_same_outputs(probe_outputs(model, **inputs), eager, atol=1e-4)


def test_padded_rows_match_unpadded_rows(tiny_family):
    model = make_reduced_model(tiny_family)
    inputs = probe_inputs()
    with torch.no_grad():
        padded = model(**inputs).logits
        for row, start in ((1, 3), (2, 5)):
            alone = model(input_ids=inputs["input_ids"][row : row + 1, start:]).logits
            torch.testing.assert_close(padded[row : row + 1, start:], alone, atol=1e-4, rtol=0)


def test_parameter_count_matches_config(tiny_family):
    model = make_reduced_model(tiny_family)
    assert model.num_parameters() == model.config.count_parameters()
    assert isinstance(model.model.layers[1].self_attn.q_proj, OlicaLowRankLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert model.model.layers[1].mlp.linear_calibration is not None
    assert model.model.layers[0].mlp.linear_calibration is None


def test_reload_with_plugin_and_with_remote_code(tiny_family, tmp_path):
    model = make_reduced_model(tiny_family)
    expected = probe_outputs(model, **probe_inputs())
    checkpoint = save_pruned_model(model, tmp_path / "pruned")
    files = {path.name for path in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_olica.py", "configuration_olica.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(auto_map)

    # (a) the plugin is imported: registered Auto classes.
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    assert type(reloaded) is type(model)
    assert_same_outputs(probe_outputs(reloaded, **probe_inputs()), expected)
    assert reloaded.num_parameters() == model.num_parameters()

    # (b) a fresh process where optimum_olica cannot be imported: the code saved beside the weights.
    remote = run_probe(checkpoint, tmp_path, "--trust-remote-code", "--block-package")
    assert remote["model_class_is_stock"].item() == 0
    assert_same_outputs(remote, expected)


def test_base_model_loads_with_auto_model(tmp_path):
    model = make_reduced_model("llama_gqa")
    checkpoint = save_pruned_model(model, tmp_path / "pruned")
    base = AutoModel.from_pretrained(checkpoint)
    assert type(base).__name__ == "OlicaLlamaModel"
    with torch.no_grad():
        hidden = base(input_ids=probe_inputs()["input_ids"]).last_hidden_state
        torch.testing.assert_close(hidden, model.model(input_ids=probe_inputs()["input_ids"]).last_hidden_state)


def test_stock_representable_model_is_saved_as_stock(tiny_family, tmp_path):
    n = 3
    model = make_reduced_model(
        tiny_family,
        query_ranks=[None] * n,
        key_ranks=[None] * n,
        value_head_dims=[16] * n,
        intermediate_sizes=[48] * n,
        calibration_ranks=[0] * n,
    )
    expected = probe_outputs(model, **probe_inputs())
    checkpoint = save_pruned_model(model, tmp_path / "pruned")
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == TINY_FAMILIES[tiny_family][0].model_type
    assert config["intermediate_size"] == 48
    assert "auto_map" not in config
    assert not (checkpoint / "modeling_olica.py").exists()
    # (c) plain transformers in a process without the plugin.
    stock = run_probe(checkpoint, tmp_path, "--block-package")
    assert stock["model_class_is_stock"].item() == 1
    assert_same_outputs(stock, expected)


def test_sharded_checkpoint_and_tied_embeddings(tmp_path):
    model = make_reduced_model("llama_gqa")
    assert model.config.tie_word_embeddings
    checkpoint = save_pruned_model(model, tmp_path / "pruned", max_shard_size="20KB")
    assert (checkpoint / "model.safetensors.index.json").exists()
    assert len(list(checkpoint.glob("model-*.safetensors"))) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert reloaded.num_parameters() == model.num_parameters() == model.config.count_parameters()
    assert_same_outputs(probe_outputs(reloaded, **probe_inputs()), probe_outputs(model, **probe_inputs()))


def test_reload_with_dtype_and_device_map(tmp_path):
    model = make_reduced_model("qwen3")
    checkpoint = save_pruned_model(model, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map="cpu")
    assert reloaded.dtype == torch.bfloat16
    with torch.no_grad():
        logits = reloaded(**probe_inputs()).logits
    assert torch.isfinite(logits).all()


def test_config_disagreeing_with_weights_names_layer_and_field(tmp_path):
    model = make_reduced_model("llama_gqa")
    checkpoint = save_pruned_model(model, tmp_path / "pruned")
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["value_head_dims"][2] = 10
    config["intermediate_sizes"][1] = 41
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        AutoModelForCausalLM.from_pretrained(checkpoint)
    message = str(error.value)
    assert "layer 2: `value_head_dims[2]`=10" in message
    assert "layer 1: `intermediate_sizes[1]`=41" in message


def test_factored_projection_declared_dense_is_refused(tmp_path):
    model = make_reduced_model("llama_gqa")
    checkpoint = save_pruned_model(model, tmp_path / "pruned")
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["query_ranks"][1] = None
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layer 1: `query_ranks\[1\]`=None"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("value_head_dims", [16, 17, 16], r"layer 1: `value_head_dims\[1\]`=17 must be an integer in \[1, 16\]"),
        ("intermediate_sizes", [96, 0, 96], r"layer 1: `intermediate_sizes\[1\]`=0"),
        ("query_ranks", [None, 0, None], r"layer 1: `query_ranks\[1\]`=0 must be between 1 and 64"),
        ("calibration_ranks", [0, 0], r"`calibration_ranks` has 2 entries but the model has num_hidden_layers=3"),
    ],
)
def test_invalid_dimensions_are_refused(field, value, message):
    base = make_tiny_model("llama_gqa")
    with pytest.raises(Exception, match=message):
        olica_config_from(base.config, **{field: value})


def test_config_round_trip_through_auto_config(tmp_path):
    model = make_reduced_model("qwen2")
    model.config.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is type(model.config)
    for field in REDUCED_DIMENSIONS:
        assert getattr(config, field) == getattr(model.config, field)


def test_unsupported_architecture_lists_supported_families():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2, qwen3"):
        olica_config_from(GPT2Config(n_layer=1))


def test_build_olica_model_uses_given_tensors_without_copy():
    base = make_tiny_model("llama")
    state = base.state_dict()
    olica = build_olica_model(olica_config_from(base.config), state)
    assert olica.model.embed_tokens.weight.data_ptr() == state["model.embed_tokens.weight"].data_ptr()


def test_every_config_field_is_documented():
    format_doc = (Path(__file__).parents[1] / "docs" / "format.md").read_text()
    from dataclasses import fields

    from optimum_olica.modeling import OLICA_MODEL_CLASSES

    undocumented = {
        f"{config_class.__name__}.{field.name}"
        for config_class in OLICA_MODEL_CLASSES
        for field in fields(config_class)
        if f"`{field.name}`" not in format_doc
    }
    assert not undocumented, f"fields missing from docs/format.md: {sorted(undocumented)}"


def test_static_cache_holds_keys_and_values_of_different_widths():
    model = make_reduced_model("llama_gqa")
    input_ids = probe_inputs()["input_ids"][:1]
    output = model.generate(
        input_ids, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static",
        return_dict_in_generate=True, output_logits=True,
    )
    # transformers 5.24 renamed the output field past_key_values -> cache.
    cache = output.cache if "cache" in output.keys() else output.past_key_values
    assert type(cache).__name__ == "StaticCache"
    # Per layer, keys as wide as head_dim (RoPE, q/k) and values as wide as that layer's value_head_dim.
    key_widths = [layer.keys.shape[-1] for layer in cache.layers]
    value_widths = [layer.values.shape[-1] for layer in cache.layers]
    assert key_widths == [model.config.head_dim] * model.config.num_hidden_layers
    assert value_widths == REDUCED_DIMENSIONS["value_head_dims"] and len(set(value_widths)) == 3
    # Each cached decode step against a full recompute of its prefix (no cache), which cannot share a cache bug.
    for step, logits in enumerate(output.logits):
        prefix = output.sequences[:, : input_ids.shape[1] + step]
        with torch.no_grad():
            recomputed = model(prefix, use_cache=False).logits[:, -1]
        torch.testing.assert_close(logits, recomputed, atol=1e-4, rtol=0, msg=f"decode step {step}")


def test_decode_step_compiles_with_fullgraph_and_matches_eager():
    # The model class declares `_can_compile_fullgraph`, which lets `generate` compile the decode step (transformers
    # does so with a static cache on accelerators): the narrow value heads and factored projections must not break
    # the graph, and the compiled step must compute what the eager one does.
    from transformers import StaticCache

    model = make_reduced_model("llama_gqa")
    input_ids = probe_inputs()["input_ids"][:1]

    def decode(step):
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(input_ids=input_ids, past_key_values=cache, use_cache=True)
            positions = torch.tensor([input_ids.shape[1]])
            return step(input_ids=input_ids[:, -1:], past_key_values=cache, use_cache=True,
                        position_ids=positions[None], cache_position=positions).logits

    eager = decode(model)
    torch._dynamo.reset()
    compiled = decode(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
