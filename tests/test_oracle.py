"""The oracle suite: the pruned architecture and the pipeline checked against references our code does not compute.

Each test compares one of our results with something computed another way:

- generation: every cached step of ``generate`` (DynamicCache and StaticCache, batch 1 and a left-padded batch)
  against a full recompute of the same prefix without cache or padding, in this process (the plugin) and in a process
  where optimum_olica cannot be imported (``trust_remote_code``, the code saved beside the weights);
- identity: pruning that removes nothing (full dimensions, refits forced on) leaves the stock model's function;
  a recipe that prunes nothing in the attention leaves each attention sublayer's function unchanged;
- replay: capture + replay through every decoder layer reproduces the model's own forward (``output_hidden_states``);
- bookkeeping: the saved checkpoint's real forward reproduces the activations the pipeline propagated, layer by layer;
- attention kernels (eager, sdpa, flex) agree, and a ``device_map`` with disk offload equals the model in memory.

The shapes cover every family and the odd cases: MHA, MQA, 5 and 7 heads, ``head_dim`` != hidden / heads, tied and
untied embeddings, random attention and MLP biases, a sliding window shorter than the prompt, and mixed
sliding/full layers. This module is also the suite ``make test-min`` runs on the lowest declared versions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import optimum_olica  # noqa: F401  (registers the Auto classes)
import optimum_olica.pruner as pruner_module
from optimum_olica import OlicaConfig, prune_model
from optimum_olica.checkpoint import save_pruned_model
from optimum_olica.conversion import build_olica_model, olica_config_from
from optimum_olica.olica import OlicaLayerPruner
from optimum_olica.pipeline import PipelineTimings, capture_layer_inputs, replay, run_sequential
from optimum_olica.sinks import ModelSink
from optimum_olica.sources import ModelLayerSource

from conftest import make_tiny_model, random_olica_model
from oracle_probe import all_generation_discrepancies, oracle_inputs

PROBE = str(Path(__file__).with_name("oracle_probe.py"))
CPU = torch.device("cpu")
LOGIT_TOLERANCE = 1e-4  # fp32

# name -> (tiny family of conftest.TINY_FAMILIES, config overrides)
ORACLE_SHAPES = {
    "llama_mha_untied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": False}),
    "llama_mqa_tied": ("llama_gqa", {"num_key_value_heads": 1}),
    "llama_biases": ("llama_bias", {}),
    "llama_5_heads_wide_head_dim": (
        "llama", {"hidden_size": 40, "num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": 12,
                  "intermediate_size": 72},
    ),
    "mistral_short_window": ("mistral", {"sliding_window": 4}),
    "qwen2_mixed_layer_types": ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3_7_heads_mqa": (
        "qwen3", {"hidden_size": 56, "num_attention_heads": 7, "num_key_value_heads": 1, "head_dim": 16,
                  "tie_word_embeddings": False},
    ),
}


def make_stock_model(shape: str, seed: int = 0):
    family, overrides = ORACLE_SHAPES[shape]
    return make_tiny_model(family, seed=seed, **overrides)


def reduced_dimensions(config) -> dict[str, list]:
    """Every kind of reduction on a 3-layer model: factored Q and K, narrow values, FFN widths, a calibration branch."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_limit = min(config.hidden_size, config.num_attention_heads * head_dim)
    k_limit = min(config.hidden_size, config.num_key_value_heads * head_dim)
    width = config.intermediate_size
    return {
        "query_ranks": [None, q_limit // 3, q_limit - 1],
        "key_ranks": [k_limit // 2, None, None],
        "value_head_dims": [head_dim, head_dim // 2, head_dim - 3],
        "intermediate_sizes": [width, width // 2, 2 * width // 3],
        "calibration_ranks": [0, 4, 0],
    }


def make_pruned_architecture(shape: str, attn_implementation: str = "sdpa"):
    """An Olica model of ``shape`` with every reduction and random weights, biases and norms."""
    stock = make_stock_model(shape)
    model = random_olica_model(stock.config, **reduced_dimensions(stock.config))
    model.set_attn_implementation(attn_implementation)
    return model


def assert_generation_matches_recompute(discrepancies: dict) -> None:
    worst = {name: value for name, value in discrepancies.items() if name != "model_module"}
    assert max(worst.values()) < LOGIT_TOLERANCE, f"cached generation differs from a full recompute: {worst}"


# ---- generation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", list(ORACLE_SHAPES))
def test_generation_matches_full_recompute(shape, attn_implementation, single_thread):
    model = make_pruned_architecture(shape, attn_implementation)
    assert_generation_matches_recompute(all_generation_discrepancies(model, oracle_inputs()))


@pytest.mark.parametrize("shape", list(ORACLE_SHAPES))
def test_stock_generation_matches_full_recompute(shape, single_thread):
    # The harness itself: transformers' own model passes the same oracle (a failure here is not ours).
    assert_generation_matches_recompute(all_generation_discrepancies(make_stock_model(shape), oracle_inputs()))


@pytest.mark.parametrize("shape", list(ORACLE_SHAPES))
def test_generation_with_remote_code_without_the_package(shape, tmp_path):
    model = make_pruned_architecture(shape)
    checkpoint = save_pruned_model(model, tmp_path / "pruned")
    inputs_path, result_path = tmp_path / "inputs.safetensors", tmp_path / "result.json"
    save_file(oracle_inputs(), inputs_path)
    subprocess.run(
        [sys.executable, PROBE, str(checkpoint), str(inputs_path), str(result_path), "--trust-remote-code",
         "--block-package"],
        check=True, capture_output=True, text=True, cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=300,
    )
    result = json.loads(result_path.read_text())
    assert not result["model_module"].startswith("optimum_olica"), result["model_module"]
    assert_generation_matches_recompute(result)


def test_cache_passed_under_both_names_is_refused():
    model = make_pruned_architecture("llama_mqa_tied")
    from transformers import DynamicCache

    first, second = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with pytest.raises(ValueError, match="Pass the KV cache once"):
        model(input_ids=oracle_inputs()["input_ids"], cache=first, past_key_values=second)


# ---- identity ---------------------------------------------------------------------------------------------------


def calibration_ids(vocab_size: int = 128, samples: int = 16, length: int = 16) -> torch.Tensor:
    # More tokens than any projection has inputs: with fewer, the refits are underdetermined and float32 noise in
    # their targets moves the solution in the unexcited directions (measured 1e-4 instead of 1e-5 at 72 tokens).
    return torch.randint(3, vocab_size, (samples, length), generator=torch.Generator().manual_seed(7))


def prune_at_full_dimensions(model, input_ids, *, refit_damping: float):
    """The whole pipeline and layer algorithm (statistics, rotation, neuron ordering, o_proj and down_proj refits)
    with a plan that keeps every dimension."""
    plan = olica_config_from(model.config)
    plan._attn_implementation = model.config._attn_implementation
    activations = capture_layer_inputs(model, input_ids, batch_size=2, storage_device=CPU, input_device=CPU)
    algorithm = OlicaLayerPruner(plan, refit_damping=refit_damping)
    run_sequential(
        ModelLayerSource(model), ModelSink(model), activations, algorithm, CPU,
        timings=PipelineTimings(), progress=False,
    )
    return build_olica_model(plan, model.state_dict()).eval()


@pytest.mark.parametrize("shape", list(ORACLE_SHAPES))
def test_pruning_nothing_with_refits_forced_keeps_the_stock_function(shape, single_thread):
    reference = make_stock_model(shape)
    probe = oracle_inputs()
    with torch.no_grad():
        expected = reference(**probe).logits * probe["attention_mask"][..., None]
    pruned = prune_at_full_dimensions(make_stock_model(shape), calibration_ids(), refit_damping=1e-2)
    with torch.no_grad():
        actual = pruned(**probe).logits * probe["attention_mask"][..., None]
    torch.testing.assert_close(actual, expected, atol=LOGIT_TOLERANCE, rtol=0)


@pytest.mark.parametrize("shape", ["llama_biases", "qwen2_mixed_layer_types", "qwen3_7_heads_mqa"])
def test_recipe_that_keeps_attention_whole_keeps_each_attention_function(shape, single_thread):
    reference = make_stock_model(shape)
    # Aimed at the dense layer on the pruned inputs (trajectory_weight=0): aimed at the dense model's own states, the
    # refit of a whole attention also takes back the error of the pruned FFNs before it, and changes its function.
    recipe = OlicaConfig(ratio=0.2, qk_ratio=0.0, vo_ratio=0.0, refit_damping=1e-2, trajectory_weight=0.0)
    pruned = prune_model(make_stock_model(shape), recipe, calibration_ids(), progress=False).model
    hidden = torch.randn(2, 10, reference.config.hidden_size, generator=torch.Generator().manual_seed(5))
    position_ids = torch.arange(10)[None]
    with torch.no_grad():
        rotary = reference.model.rotary_emb(hidden, position_ids)
        for dense_layer, pruned_layer in zip(reference.model.layers, pruned.model.layers):
            expected = dense_layer.self_attn(hidden, position_embeddings=rotary, attention_mask=None)[0]
            actual = pruned_layer.self_attn(hidden, position_embeddings=rotary, attention_mask=None)[0]
            # Relative: the rotation and the o_proj refit round in float32 (measured up to 1.3e-5; a real change of
            # function, such as the bias fitted into the weights, is of order 1e-1).
            assert float((actual - expected).norm()) <= 1e-4 * float(expected.norm())
            assert pruned_layer.mlp.intermediate_size < dense_layer.mlp.intermediate_size  # the FFN did shrink


# ---- replay -----------------------------------------------------------------------------------------------------


def assert_replay_reproduces_forward(model, input_ids) -> None:
    with torch.no_grad():
        expected = model(input_ids=input_ids, output_hidden_states=True).hidden_states
    activations = capture_layer_inputs(model, input_ids, batch_size=2, storage_device=CPU, input_device=CPU)
    layers = model.model.layers
    for layer_idx, layer in enumerate(layers):
        activations.hidden_states = replay(layer, activations, CPU, layer_idx=layer_idx)
        output = torch.cat(activations.hidden_states)
        if layer_idx == len(layers) - 1:
            output = model.model.norm(output)  # the last recorded hidden state is the normalised one
        torch.testing.assert_close(output, expected[layer_idx + 1], atol=1e-6, rtol=0, msg=f"layer {layer_idx}")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", list(ORACLE_SHAPES))
def test_replay_reproduces_the_stock_forward(shape, attn_implementation):
    model = make_stock_model(shape)
    model.set_attn_implementation(attn_implementation)
    assert_replay_reproduces_forward(model, calibration_ids())


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", list(ORACLE_SHAPES))
def test_replay_reproduces_the_pruned_forward(shape, attn_implementation):
    assert_replay_reproduces_forward(make_pruned_architecture(shape, attn_implementation), calibration_ids())


# ---- bookkeeping ------------------------------------------------------------------------------------------------


def record_propagated_activations(monkeypatch) -> dict[int, torch.Tensor]:
    """Wraps the pipeline's layer loop to keep, after each layer, the activations it hands to the next one (the
    pipeline stores a layer in its sink once the activations hold the next layer's inputs)."""
    recorded, real_loop = {}, pruner_module.run_sequential

    def recording_loop(source, sink, activations, *args, **kwargs):
        class RecordingSink:
            def store(self, layer_idx, layer, record):
                recorded[layer_idx] = torch.cat([batch.clone() for batch in activations.hidden_states])
                sink.store(layer_idx, layer, record)

        return real_loop(source, RecordingSink(), activations, *args, **kwargs)

    monkeypatch.setattr(pruner_module, "run_sequential", recording_loop)
    return recorded


# The default recipe on every shape, and the paths it may not take: a refit forced on (both sub-blocks' outputs
# computed from their kept features, whatever "auto" decides), no refit at all, and a skipped layer. Exact widths
# (dimension_multiple=1), so that every part is pruned: at the default multiple of 8, value heads 12 or 16 wide stay
# whole at 30%; one run keeps the default multiple.
EXACT = {"dimension_multiple": 1}
BOOKKEEPING_RUNS = {
    **{shape: (shape, OlicaConfig(ratio=0.3, **EXACT)) for shape in ORACLE_SHAPES},
    "llama_biases_forced_refit": ("llama_biases", OlicaConfig(ratio=0.3, refit_damping=0.1, **EXACT)),
    "qwen3_7_heads_mqa_no_refit": ("qwen3_7_heads_mqa", OlicaConfig(ratio=0.3, refit_damping=None, **EXACT)),
    "llama_mqa_tied_skip_1": ("llama_mqa_tied", OlicaConfig(ratio=0.3, refit_damping=0.1, skip_layers=[1], **EXACT)),
    "llama_biases_default_multiple": ("llama_biases", OlicaConfig(ratio=0.3)),
}


@pytest.mark.parametrize("run", list(BOOKKEEPING_RUNS))
def test_saved_checkpoint_reproduces_the_propagated_activations(run, tmp_path, monkeypatch, single_thread):
    shape, recipe = BOOKKEEPING_RUNS[run]
    recorded = record_propagated_activations(monkeypatch)
    input_ids = calibration_ids()
    result = prune_model(make_stock_model(shape), recipe, input_ids, progress=False)
    checkpoint = save_pruned_model(result.model, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    if recipe.dimension_multiple == 1:
        assert min(reloaded.config.value_head_dims) < reloaded.config.attention_head_dim, "narrow values expected"
    with torch.no_grad():
        hidden_states = reloaded(input_ids=input_ids, output_hidden_states=True).hidden_states
    num_layers = reloaded.config.num_hidden_layers
    assert sorted(recorded) == list(range(num_layers))
    for layer_idx in range(num_layers):
        propagated = recorded[layer_idx]
        if layer_idx == num_layers - 1:
            propagated = reloaded.model.norm(propagated)
        torch.testing.assert_close(
            hidden_states[layer_idx + 1], propagated, atol=1e-5, rtol=1e-5, msg=f"layer {layer_idx}"
        )


# ---- attention kernels and placement ----------------------------------------------------------------------------


def masked_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits * inputs["attention_mask"][..., None]


def test_eager_sdpa_and_flex_attention_agree():
    # flex_attention compiles its kernel (about 20 s on CPU): one shape with narrow values and mixed layer types.
    model = make_pruned_architecture("qwen2_mixed_layer_types", "eager")
    inputs = oracle_inputs()
    eager = masked_logits(model, inputs)
    for implementation in ("sdpa", "flex_attention"):
        model.set_attn_implementation(implementation)
        torch.testing.assert_close(masked_logits(model, inputs), eager, atol=LOGIT_TOLERANCE, rtol=0,
                                   msg=implementation)


@pytest.mark.parametrize("shape", ["llama_mqa_tied", "qwen3_7_heads_mqa"])
def test_device_map_with_disk_offload_equals_in_memory(shape, tmp_path):
    model = make_pruned_architecture(shape)
    checkpoint = save_pruned_model(model, tmp_path / "pruned")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map=device_map, offload_folder=str(tmp_path / "offload"), dtype=torch.float32
    ).eval()
    assert any(param.device.type == "meta" for param in offloaded.model.layers[1].parameters())
    inputs = oracle_inputs()
    torch.testing.assert_close(masked_logits(offloaded, inputs), masked_logits(model, inputs), atol=1e-5, rtol=0)
    assert_generation_matches_recompute({"offloaded": all_generation_discrepancies(offloaded, inputs)["dynamic_left_padded"]})


def test_resaving_with_the_plugin_refreshes_the_saved_modeling_code(tmp_path):
    # The documented way to repair a checkpoint whose saved modeling code predates the `cache` rename: load with the
    # plugin (its code wins) and save again. A stale file stands in for the old code.
    import optimum_olica.modeling.modeling_olica as installed

    checkpoint = save_pruned_model(make_pruned_architecture("llama_mqa_tied"), tmp_path / "old")
    (checkpoint / "modeling_olica.py").write_text("# stale modeling code\n" + Path(installed.__file__).read_text())
    refreshed = tmp_path / "refreshed"
    AutoModelForCausalLM.from_pretrained(checkpoint).save_pretrained(refreshed)
    assert (refreshed / "modeling_olica.py").read_text() == Path(installed.__file__).read_text()
