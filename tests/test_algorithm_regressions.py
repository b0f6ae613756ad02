"""The layer algorithm and the calibration pipeline against references they cannot share bugs with.

Each reference is computed here, independently of the code under test: the stock model's own forward
(``output_hidden_states``), a brute-force least-squares solve, the real forward of the finished pruned layer, or a
parameter count from the shapes. Regressions of issue 13: the KV-cache argument replayed into every layer (1), the
``o_proj`` refit fitting the attention bias into the weights (2), one mask replayed into every layer type (3), pinned
part ratios missing the target silently (7), skipped layers rotated and refitted (8), re-pruning a pruned checkpoint.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

import optimum_olica  # noqa: F401  (registers the pruned architectures)
from optimum_olica import OlicaConfig, OlicaPruner
from optimum_olica.allocation import RatioTooHighError, RatioTooLowError, plan_dimensions
from optimum_olica.conversion import olica_config_from
from optimum_olica.errors import OlicaError
from optimum_olica.olica import OlicaLayerPruner
from optimum_olica.pipeline import (
    ATTENTION,
    MLP,
    SUB_BLOCKS,
    PipelineTimings,
    SubBlockPasses,
    block_features,
    block_output,
    capture_layer_inputs,
    replay,
)
from optimum_olica.sources import decoder_layers
from optimum_olica.pruner import prune_model

from conftest import make_tiny_model
from tiny_checkpoint import make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")
# A fixed refit damping forces the refit on ("auto" may decline it) and skips the cross-validation.
FORCED_REFIT = 0.01
# Qwen2 with layers 0-1 full attention and 2-3 sliding (window 4 < the 16-token sequences).
MIXED_QWEN2 = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2, num_hidden_layers=4)


def calibration_ids(num_samples: int = 8, sequence_length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (num_samples, sequence_length), generator=torch.Generator().manual_seed(seed))


def capture(model, input_ids, batch_size: int = 4):
    return capture_layer_inputs(model, input_ids, batch_size=batch_size, storage_device=CPU, input_device=CPU)


# ---- capture and replay (defects 1 and 3) ---------------------------------------------------------------------------


def test_capture_replays_no_cache_argument_and_warns_nothing():
    model = make_tiny_model("llama_gqa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5.24 warns once per layer call about `past_key_values`
        activations = capture(model, calibration_ids())
        for layer_idx, layer in enumerate(decoder_layers(model)):
            activations.hidden_states = replay(layer, activations, CPU, layer_idx=layer_idx)
    for batch_kwargs in activations.layer_kwargs:
        for kwargs in batch_kwargs:
            assert not {"cache", "past_key_values"} & set(kwargs), sorted(kwargs)


def test_captured_masks_follow_the_layer_types_and_are_shared():
    model = make_tiny_model("qwen2", **MIXED_QWEN2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    activations = capture(model, calibration_ids(), batch_size=4)
    for batch_kwargs in activations.layer_kwargs:
        masks = [kwargs["attention_mask"] for kwargs in batch_kwargs]
        # One mask per layer type, the same object for every layer of that type: memory does not grow with depth.
        assert masks[0] is masks[1] and masks[2] is masks[3]
        # The window (4) is shorter than the sequence (16): the sliding layers get a mask of their own (SDPA's full
        # causal attention may need none).
        assert isinstance(masks[2], torch.Tensor) and masks[1] is not masks[2]
        rotary = [kwargs["position_embeddings"][0] for kwargs in batch_kwargs]
        assert all(cos is rotary[0] for cos in rotary)


def test_capture_leaves_the_model_as_it_was():
    model = make_tiny_model("llama_gqa")
    input_ids = calibration_ids(num_samples=2)
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    capture(model, calibration_ids())
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, before)


# ---- the o_proj refit and the attention bias (defect 2) -------------------------------------------------------------


def test_whole_attention_with_forced_refit_keeps_the_attention_output():
    """Q/K/V/O left whole: the refit must give o_proj back (the rotation is orthogonal), bias included."""
    dense, model = make_tiny_model("llama_bias"), make_tiny_model("llama_bias")
    assert dense.model.layers[0].self_attn.o_proj.bias.abs().max() > 0.05  # randomised, not transformers' zeros
    config = OlicaConfig(ratio=0.2, qk_ratio=0.0, vo_ratio=0.0, ffn_ratio=0.5, refit_damping=FORCED_REFIT)
    result = prune_model(model, config, calibration_ids(), progress=False)
    assert result.report["layers"][0]["o_proj_refit_damping"] == FORCED_REFIT  # the refit did run

    outputs = {}
    for name, lm in (("dense", dense), ("pruned", result.model)):
        attention = lm.model.layers[0].self_attn
        handle = attention.register_forward_hook(
            lambda module, args, output, name=name: outputs.update({name: output[0]})
        )
        with torch.no_grad():
            lm(input_ids=calibration_ids(num_samples=3, seed=7))  # not the calibration data
        handle.remove()
    torch.testing.assert_close(outputs["pruned"], outputs["dense"], atol=1e-4, rtol=0)


def test_every_part_ratio_zero_with_forced_refit_keeps_the_logits():
    dense, model = make_tiny_model("llama_bias"), make_tiny_model("llama_bias")
    config = OlicaConfig(ratio=0.2, qk_ratio=0.0, vo_ratio=0.0, ffn_ratio=0.0, refit_damping=FORCED_REFIT)
    result = prune_model(model, config, calibration_ids(), progress=False)
    probe = calibration_ids(num_samples=3, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(result.model(input_ids=probe).logits, dense(input_ids=probe).logits,
                                   atol=1e-4, rtol=0)


# ---- the layer algorithm's paths against independent computations (item 7) -----------------------------------------


def _pruner_for(model, config: OlicaConfig, **kwargs) -> OlicaLayerPruner:
    """The algorithm exactly as prune_model builds it (same plan), driven here one step at a time."""
    full = olica_config_from(model.config)
    plan = plan_dimensions(full, config.ratio, qk_ratio=config.qk_ratio, vo_ratio=config.vo_ratio,
                           ffn_ratio=config.ffn_ratio, dimension_multiple=config.dimension_multiple)
    plan_config = olica_config_from(model.config, **plan.per_layer_lists())
    plan_config._attn_implementation = model.config._attn_implementation
    return OlicaLayerPruner(plan_config, refit_damping=config.refit_damping, **kwargs)


def _first_layer_pruned(family: str):
    """Layer 0 of a tiny ``family`` model taken through the algorithm's first steps (statistics, then ``prune``) at
    30% with the refit forced; returns the captured activations, the dense layer, the algorithm, the pruned layer
    (not yet refitted) and ``run(module)``, which replays a module in layer 0's place."""
    model = make_tiny_model(family)
    activations = capture(model, calibration_ids())
    dense = decoder_layers(model)[0]
    run = lambda module: replay(module, activations, CPU, layer_idx=0, keep_outputs=False)  # noqa: E731
    # Exact widths: at the default multiple of 8 the 16-wide value heads would stay whole at 30%.
    algorithm = _pruner_for(model, OlicaConfig(ratio=0.3, refit_damping=0.1, dimension_multiple=1))
    with algorithm.observe_dense(dense, 0):
        run(dense)
    pruned = algorithm.prune(dense, 0)
    assert pruned.self_attn.value_head_dim < pruned.self_attn.head_dim, "narrow value heads expected"
    return activations, dense, algorithm, pruned, run


def _inputs_and_outputs(module, submodule_name: str, run) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows fed to, and produced by, ``module.<submodule_name>`` while ``run()`` runs."""
    inputs, outputs = [], []
    target = module.get_submodule(submodule_name)

    def keep(module, args, kwargs, output):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handle = target.register_forward_hook(keep, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    flat = lambda tensors: torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors]).double()  # noqa: E731
    return flat(inputs), flat(outputs)


def _damped_least_squares(inputs, targets, prior, damping: float) -> torch.Tensor:
    """argmin ||inputs W^T - targets||^2 + lam ||W - prior||^2, lam = damping * mean(diag(inputs^T inputs)), solved
    as one stacked least-squares problem in float64 (no normal equations)."""
    lam = damping * float((inputs.T @ inputs).diagonal().mean())
    stacked_inputs = torch.cat([inputs, lam**0.5 * torch.eye(inputs.shape[1], dtype=torch.float64)])
    stacked_targets = torch.cat([targets, lam**0.5 * prior.double().T])
    return torch.linalg.lstsq(stacked_inputs, stacked_targets).solution.T


def _attention_output(layer, states, kwargs):
    """The attention half of ``layer`` on its inputs, from the real modules (no residual)."""
    return layer.self_attn(hidden_states=layer.input_layernorm(states), **kwargs)[0]


def _passes(activations, algorithm) -> SubBlockPasses:
    return SubBlockPasses(activations, algorithm, CPU, 0, PipelineTimings())


@pytest.mark.parametrize("family", ["llama_bias", "qwen3"])
def test_o_proj_refit_is_the_damped_least_squares_solution(family):
    activations, dense, algorithm, pruned, run = _first_layer_pruned(family)
    before_refit = copy.deepcopy(pruned)

    # The brute-force reference: Y, the dense attention output less o_proj's bias (the bias is kept, not fitted);
    # Z, the o_proj inputs of the pruned attention on the same tokens; W' the damped least-squares fit of Y on Z.
    def attention_pass(layer):
        def run_attention():
            for states, kwargs in zip(activations.hidden_states, activations.kwargs_of_layer(0)):
                with torch.no_grad():
                    _attention_output(layer, states, kwargs)
        return run_attention

    _, dense_output = _inputs_and_outputs(dense, "self_attn", attention_pass(dense))
    values, _ = _inputs_and_outputs(before_refit, "self_attn.o_proj", attention_pass(before_refit))
    o_proj = before_refit.self_attn.o_proj
    target = dense_output - (0 if o_proj.bias is None else o_proj.bias.double())
    expected = _damped_least_squares(values, target, o_proj.weight, 0.1)

    passes = _passes(activations, algorithm)
    passes.fit(ATTENTION, pruned, passes.features(ATTENTION, pruned, activations.hidden_states))
    refitted = pruned.self_attn.o_proj.weight.double()
    assert not torch.allclose(refitted, o_proj.weight.double(), atol=1e-3)  # the refit changed something
    torch.testing.assert_close(refitted, expected, atol=1e-5, rtol=1e-5)
    if o_proj.bias is not None:
        assert torch.equal(pruned.self_attn.o_proj.bias, o_proj.bias)


@pytest.mark.parametrize("family", ["llama_bias", "qwen2"])
def test_down_proj_refit_and_sub_block_outputs_match_brute_force(family):
    """The MLP's fit refits down_proj to the damped least-squares fit of what the FFN must add to the pruned layer's
    residual stream to give the dense layer's output; the outputs computed from the kept features are those of the
    real finished layer."""
    activations, dense, algorithm, pruned, run = _first_layer_pruned(family)
    passes = _passes(activations, algorithm)
    attention_features = passes.features(ATTENTION, pruned, activations.hidden_states)
    passes.fit(ATTENTION, pruned, attention_features)
    hidden = passes.outputs(ATTENTION, pruned, activations.hidden_states, attention_features)
    before_down_refit = copy.deepcopy(pruned)
    mlp_features = passes.features(MLP, pruned, hidden)
    passes.fit(MLP, pruned, mlp_features)
    outputs = passes.outputs(MLP, pruned, hidden, mlp_features)

    # The reference, from the real modules: h = x + attention(x) of the pruned layer, a = the FFN activation on
    # norm(h), target = dense layer output - h - down_proj's bias.
    dense_output = torch.cat(replay(dense, activations, CPU, layer_idx=0)).double().reshape(-1, dense.hidden_size)
    mlp = before_down_refit.mlp
    residuals, ffn_activations = [], []
    for states, kwargs in zip(activations.hidden_states, activations.kwargs_of_layer(0)):
        with torch.no_grad():
            h = states + _attention_output(before_down_refit, states, kwargs)
            x = before_down_refit.post_attention_layernorm(h)
            residuals.append(h.reshape(-1, h.shape[-1]))
            ffn_activations.append((mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).reshape(-1, mlp.intermediate_size))
    target = dense_output - torch.cat(residuals).double()
    if mlp.down_proj.bias is not None:
        target = target - mlp.down_proj.bias.double()
    expected = _damped_least_squares(torch.cat(ffn_activations).double(), target, mlp.down_proj.weight, 0.1)

    refitted = pruned.mlp.down_proj.weight.double()
    assert not torch.allclose(refitted, mlp.down_proj.weight.double(), atol=1e-3)
    torch.testing.assert_close(refitted, expected, atol=1e-5, rtol=1e-5)
    # The outputs computed from the kept features are the real finished layer's, bit for bit.
    finished = torch.cat(replay(pruned, activations, CPU, layer_idx=0))
    assert torch.equal(torch.cat(outputs), finished)
    assert all(batch is None for batch in attention_features + mlp_features)  # each kept batch released once used


@pytest.mark.parametrize("family", ["llama_bias", "qwen3", "mistral"])
def test_sub_blocks_compose_to_the_decoder_layer(family):
    """block_features then block_output, attention then MLP, is the stock decoder layer's own forward, bit for bit
    (random biases and norms included): the pipeline's sub-block passes change no result."""
    model = make_tiny_model(family)
    activations = capture(model, calibration_ids())
    layer = decoder_layers(model)[1]
    with torch.no_grad():
        for states, kwargs in zip(activations.hidden_states, activations.kwargs_of_layer(1)):
            hidden = states
            for block in SUB_BLOCKS:
                block_kwargs = kwargs if block.takes_layer_kwargs else {}
                hidden = block_output(layer, block, hidden, block_features(layer, block, hidden, block_kwargs))
            assert torch.equal(hidden, layer(states, **kwargs))


# ---- skipped layers stay dense (defect 8) ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama_bias", "qwen3"])
def test_skipped_layers_are_bit_identical_in_memory(family):
    model = make_tiny_model(family)
    dense = {name: tensor.clone() for name, tensor in model.model.layers[1].state_dict().items()}
    config = OlicaConfig(ratio=0.2, skip_layers=[1], refit_damping=FORCED_REFIT)
    result = prune_model(model, config, calibration_ids(), progress=False)
    kept = result.model.model.layers[1].state_dict()
    assert sorted(kept) == sorted(dense)
    assert all(torch.equal(kept[name], dense[name]) for name in dense), [
        name for name in dense if not torch.equal(kept[name], dense[name])
    ]
    assert result.report["layers"][1].get("o_proj_refit_damping") is None  # no refit ran
    assert result.report["layers"][1]["down_proj_refit_damping"] is None
    assert result.report["layers"][0]["o_proj_refit_damping"] == FORCED_REFIT  # the others were refitted


def test_skipped_layers_are_bit_identical_in_saved_checkpoints(tmp_path):
    base = make_tiny_model("llama_bias")
    base.save_pretrained(tmp_path / "base")
    dense = {f"model.layers.0.{name}": tensor.clone() for name, tensor in base.model.layers[0].state_dict().items()}
    config = OlicaConfig(ratio=0.2, skip_layers=[0], refit_damping=FORCED_REFIT)
    OlicaPruner(make_tiny_model("llama_bias")).prune(
        config, calibration_ids(), save_directory=tmp_path / "memory", progress=False
    )
    OlicaPruner.from_pretrained(tmp_path / "base", streaming=True).prune(
        config, calibration_ids(), save_directory=tmp_path / "streamed", progress=False
    )
    for output in ("memory", "streamed"):
        saved = {}
        for file in (tmp_path / output).glob("*.safetensors"):
            with safe_open(file, framework="pt") as handle:
                layer_keys = [key for key in handle.keys() if key.startswith("model.layers.0.")]
                saved.update({key: handle.get_tensor(key) for key in layer_keys})
        assert sorted(saved) == sorted(dense), output
        assert all(torch.equal(saved[name], dense[name]) for name in dense), output


# ---- pinned part ratios (defect 7) ----------------------------------------------------------------------------------

LLAMA3_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                        num_hidden_layers=32, vocab_size=128256)


def llama3_8b_parameters(q_rank=None, k_rank=None, value_head_dim=128, ffn_width=14336) -> int:
    """All parameters of a Llama-3-8B shape with the given per-layer dimensions, counted from the shapes."""
    d, heads, kv_heads, head_dim, layers, vocab = 4096, 32, 8, 128, 32, 128256

    def linear(n_in, n_out, rank):
        return n_in * n_out if rank is None else rank * (n_in + n_out)

    attention = (linear(d, heads * head_dim, q_rank) + linear(d, kv_heads * head_dim, k_rank)
                 + d * kv_heads * value_head_dim + heads * value_head_dim * d)
    layer = attention + 3 * d * ffn_width + 2 * d  # gate, up, down; two RMSNorm weights
    return layers * layer + 2 * vocab * d + d  # untied embeddings and LM head; the final norm


def test_pinned_part_ratios_that_overshoot_the_target_are_refused():
    config = olica_config_from(LLAMA3_8B)
    # qk_ratio=0.9 keeps ceil(0.1 * n / 2) of the rank; vo_ratio=0.5 keeps 64 of 128 value channels.
    lowest = 1 - llama3_8b_parameters(q_rank=205, k_rank=52, value_head_dim=64) / llama3_8b_parameters()
    assert lowest == pytest.approx(0.118, abs=5e-4)  # the 11.8%, with the FFN kept whole
    with pytest.raises(RatioTooLowError) as error:
        plan_dimensions(config, 0.05, qk_ratio=0.9, vo_ratio=0.5)
    message = str(error.value)
    assert isinstance(error.value, OlicaError) and isinstance(error.value, ValueError)
    assert f"{lowest:.1%}" in message and "qk_ratio" in message and "vo_ratio" in message, message
    # A target inside the range is met, by an independent count of the planned shapes.
    plan = plan_dimensions(config, 0.3, qk_ratio=0.9, vo_ratio=0.5)
    layer = plan.layers[0]
    after = llama3_8b_parameters(layer.query_rank, layer.key_rank, layer.value_head_dim, layer.intermediate_size)
    assert abs(1 - after / llama3_8b_parameters() - 0.3) <= 0.005


def test_pinned_part_ratios_are_refused_before_any_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the calibration data was captured before the recipe was checked")

    monkeypatch.setattr("optimum_olica.pruner.capture_layer_inputs", fail)
    with pytest.raises(OlicaError, match="cannot be reached"):
        prune_model(make_tiny_model("llama_gqa"), OlicaConfig(ratio=0.05, qk_ratio=0.9, vo_ratio=0.9),
                    calibration_ids(), progress=False)


def test_a_pinned_ffn_ratio_that_misses_the_target_warns():
    config = olica_config_from(LLAMA3_8B)
    with pytest.warns(UserWarning, match="is not solved for"):
        plan_dimensions(config, 0.3, ffn_ratio=0.1)


def test_too_high_a_ratio_with_attention_at_its_limit_does_not_advise_pruning_attention_harder():
    config = olica_config_from(LLAMA3_8B)
    with pytest.raises(RatioTooHighError) as error:
        plan_dimensions(config, 0.95, qk_ratio=0.99, vo_ratio=0.99)
    assert "attention harder" not in str(error.value) and "at most" in str(error.value)


# ---- an Olica checkpoint is refused up front --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("olica") / "pruned"
    tokenizer = make_tiny_tokenizer()  # saved with it, as OlicaPruner does: the CLI loads the tokenizer first
    model = make_tiny_model("llama_gqa", vocab_size=len(tokenizer))
    recipe = OlicaConfig(ratio=0.2, refit_damping=FORCED_REFIT)
    OlicaPruner(model, tokenizer).prune(recipe, calibration_ids(), save_directory=directory, progress=False)
    assert json.loads((directory / "config.json").read_text())["model_type"] == "olica_llama"
    return directory


def test_pruning_a_pruned_checkpoint_is_refused_before_loading_it(monkeypatch, pruned_checkpoint):
    def fail(*args, **kwargs):
        raise AssertionError("the weights were loaded before the checkpoint was refused")

    monkeypatch.setattr("optimum_olica.pruner.AutoModelForCausalLM.from_pretrained", fail)
    for streaming in (False, True):
        with pytest.raises(OlicaError, match=r"already pruned by Olica \(model_type='olica_llama'\)") as error:
            OlicaPruner.from_pretrained(pruned_checkpoint, streaming=streaming)
        assert "prune the base model" in str(error.value)


def test_pruning_a_loaded_pruned_model_is_refused_before_capture(monkeypatch, pruned_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(pruned_checkpoint)

    def fail(*args, **kwargs):
        raise AssertionError("the calibration data was captured before the model was refused")

    monkeypatch.setattr("optimum_olica.pruner.capture_layer_inputs", fail)
    with pytest.raises(OlicaError, match="already pruned by Olica") as error:
        prune_model(model, OlicaConfig(ratio=0.2), calibration_ids(), progress=False)
    assert "ratio=0.360 of the base model" in str(error.value)  # 1 - 0.8 * 0.8
    with pytest.raises(OlicaError, match="already pruned by Olica"):
        OlicaPruner(model)


def test_the_cli_refuses_a_pruned_checkpoint(pruned_checkpoint, tmp_path, capsys):
    from optimum_olica.commands import main

    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(pruned_checkpoint), str(tmp_path / "again"), "--ratio", "0.2"])
    assert exit_.value.code == 1
    error = capsys.readouterr().err
    assert "already pruned by Olica" in error and "Traceback" not in error
    assert not (tmp_path / "again").exists()


def test_the_cli_refuses_a_pruned_checkpoint_before_looking_for_its_tokenizer(pruned_checkpoint, tmp_path, capsys):
    from optimum_olica.commands import main

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((pruned_checkpoint / "config.json").read_text())
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(config_only), str(tmp_path / "again"), "--ratio", "0.2"])
    assert exit_.value.code == 1
    error = capsys.readouterr().err
    assert "already pruned by Olica" in error and "tokenizer" not in error
