"""Property and fuzz tests (hypothesis).

1. Random tiny models (family, heads, KV heads dividing them, head dim, widths, 1-3 layers) and random recipes
   (ratio 0.05-0.6, calibration branch or not): pruning either refuses the ratio (``RatioTooHighError``,
   ``RatioTooLowError``, ``RatioUnreachableError``) or gives a checkpoint that saves, reloads with ``from_pretrained``, removes the target
   fraction of parameters within half a point (counted from the tensors of the model before and of the reloaded
   checkpoint, not taken from the report), has the parameter count the report gives, and gives finite logits.
2. ``OlicaConfig.from_dict`` / ``from_pretrained`` on random JSON-like values: a config, or the package's own
   ``OlicaConfigError``; never any other exception.
3. The CLI's argument parsing on random argv: a parsed recipe, argparse's usage error (exit 2), or ``OlicaConfigError``.

Example counts are small and deadlines off, so the file runs in about a minute on two busy cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import optimum_olica  # noqa: F401
from optimum_olica.allocation import RatioTooHighError, RatioTooLowError, RatioUnreachableError
from optimum_olica.configuration import OlicaConfig
from optimum_olica.errors import OlicaConfigError
from optimum_olica.pruner import OlicaPruner

from conftest import TINY_FAMILIES

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
VOCAB_SIZE = 64
# The documented promise (docs/method.md): the achieved fraction is within half a percentage point of the target.
PROMISED_TOLERANCE = 0.005


@st.composite
def tiny_models(draw):
    family = draw(st.sampled_from(FAMILIES))
    heads = draw(st.sampled_from([2, 4, 6]))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    hidden = heads * head_dim
    values = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=draw(st.integers(8, 96)),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=64,
        initializer_range=0.2,
        tie_word_embeddings=draw(st.booleans()),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        values.update(attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))
    if family == "mistral":
        values["sliding_window"] = draw(st.sampled_from([None, 8]))
    seed = draw(st.integers(0, 2**16))
    return family, values, seed


recipes = st.builds(
    lambda ratio, calibrated, rank_ratio, refit: OlicaConfig(
        ratio=ratio, num_calibrated_layers=calibrated, calibration_rank_ratio=rank_ratio, refit_damping=refit
    ),
    ratio=st.floats(0.05, 0.6),
    calibrated=st.integers(0, 2),
    rank_ratio=st.sampled_from([0.05, 0.1, 0.25]),
    refit=st.sampled_from(["auto", None, 0.1]),
)


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted from the model's tensors: each distinct tensor once (tied embeddings once)."""
    distinct = {parameter.data_ptr(): parameter.numel() for parameter in model.parameters()}
    return sum(distinct.values())


def build(family: str, values: dict, seed: int):
    config_class, model_class, _ = TINY_FAMILIES[family]
    torch.manual_seed(seed)
    return model_class(config_class(**values)).eval()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model_spec=tiny_models(), recipe=recipes)
def test_pruning_random_tiny_models_gives_loadable_checkpoints(model_spec, recipe, tmp_path_factory):
    family, values, seed = model_spec
    ids = torch.randint(3, VOCAB_SIZE, (4, 16), generator=torch.Generator().manual_seed(seed))
    model = build(family, values, seed)
    parameters_before = count_parameters(model)  # before pruning, which replaces the layers in place
    pruner = OlicaPruner(model)
    try:
        pruned = pruner.prune(recipe, ids, progress=False)
    except (RatioTooHighError, RatioTooLowError, RatioUnreachableError):
        event("ratio refused")
        return  # a refusal naming the ratio is a correct answer for a model this small
    event("pruned")

    directory = tmp_path_factory.mktemp("pruned") / "out"
    pruner.save_pretrained(directory)
    reloaded = AutoModelForCausalLM.from_pretrained(directory).eval()
    parameters_after = count_parameters(reloaded)
    # The allocation's promise, against what the checkpoint really holds.
    achieved = 1 - parameters_after / parameters_before
    assert abs(achieved - recipe.ratio) <= PROMISED_TOLERANCE + 1e-12, (
        f"{parameters_before:,} -> {parameters_after:,} removes {achieved:.2%}, target {recipe.ratio:.2%}"
    )
    report = pruner.report
    assert (report["parameters_before"], report["parameters_after"]) == (parameters_before, parameters_after)
    assert report["achieved_ratio"] == pytest.approx(achieved, abs=1e-12)
    assert count_parameters(pruned) == parameters_after
    with torch.no_grad():
        logits = reloaded(ids[:2]).logits
        assert torch.equal(logits, pruned(ids[:2]).logits)
    assert logits.shape == (2, 16, VOCAB_SIZE)
    assert torch.isfinite(logits).all()


# ---- fuzz: the recipe parser ------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([10**400, -(10**400)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["auto", "float32", "float64", "exact", "fast", "austen", "cpu", ""]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
FIELD_NAMES = [name for name in OlicaConfig().to_dict()]
config_dicts = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=10), json_values, max_size=6)


@settings(max_examples=300, deadline=None)
@given(config_dict=config_dicts | json_values)
def test_config_from_dict_raises_only_its_own_errors(config_dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys are dropped with a warning
        try:
            config = OlicaConfig.from_dict(config_dict)
        except OlicaConfigError:
            return
    assert OlicaConfig.from_dict(config.to_dict()) == config  # whatever is accepted round-trips


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=64) | config_dicts.map(lambda d: json.dumps(d).encode()))
def test_config_from_pretrained_raises_only_its_own_errors(content, tmp_path_factory):
    directory = tmp_path_factory.mktemp("config")
    (directory / "olica_config.json").write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            OlicaConfig.from_pretrained(directory)
        except OlicaConfigError:
            pass


# ---- fuzz: the CLI's argument parsing ---------------------------------------------------------------------------------


def _prune_parser():
    pytest.importorskip("optimum.commands.base")
    from optimum.commands.base import CommandInfo, RootOptimumCLICommand

    from optimum_olica.commands.olica import OlicaCommand

    root = RootOptimumCLICommand("optimum-cli", usage="optimum-cli")
    root.register_subcommand(CommandInfo(OlicaCommand.COMMAND.name, OlicaCommand.COMMAND.help, OlicaCommand))
    return root.parser


FLAGS = ["--ratio", "--qk-ratio", "--vo-ratio", "--ffn-ratio", "--num-samples", "--sequence-length", "--seed",
         "--skip-layers", "--refit-damping", "--statistics-dtype", "--device", "--dataset", "--dtype",
         "--num-calibrated-layers", "--calibration-rank-ratio", "--ridge-strength", "--streaming", "--overwrite",
         "--checkpoint-dir", "--offload-activations", "--no-such-flag"]
VALUES = st.sampled_from(["0.2", "1.5", "-1", "nan", "inf", "none", "auto", "0,1", "a,b", "", "1e400", "3", "x"])
SWITCHES = ["--streaming", "--overwrite", "--offload-activations", "--verbose"]
# Mostly well-formed "--flag value" pairs with odd values (so the recipe is built and validated), plus bare switches
# and arbitrary tokens (so argparse's own errors are exercised too).
argv_lists = st.lists(
    st.tuples(st.sampled_from(FLAGS), VALUES | st.text(max_size=6)) | st.sampled_from(SWITCHES).map(lambda s: (s,)),
    max_size=5,
).map(lambda pairs: [token for pair in pairs for token in pair]) | st.lists(
    st.sampled_from(FLAGS) | VALUES | st.text(max_size=8), max_size=8
)


@settings(max_examples=150, deadline=None)
@given(argv=argv_lists)
def test_cli_argument_parsing_raises_only_usage_errors_or_config_errors(argv):
    try:
        from optimum_olica.commands.prune import recipe_from_args
    except ImportError:
        pytest.skip("the CLI is not available")
    parser = _prune_parser()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(["olica", "prune", "model", "output", *argv])
    except SystemExit as exit_:
        assert exit_.code in (0, 2)  # --help, or argparse's usage error
        event("usage error")
        return
    try:
        recipe_from_args(args)
        event("recipe")
    except OlicaConfigError:
        event("config error")
