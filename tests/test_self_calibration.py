"""Self-generated calibration data (optimum_olica.self_calibration, OlicaConfig.self_calibration): the sequences are
samples of the model's own distribution (checked against its softmax), reproducible under a seed, full length, and the
pruner draws, mixes and consumes them as the recipe says."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from optimum_olica import (
    OlicaConfig,
    OlicaPruner,
    generate_calibration_ids,
    get_calibration_dataset,
    mix_calibration_ids,
)
from optimum_olica.errors import OlicaConfigError, OlicaError
from optimum_olica.hub import build_model_card
from optimum_olica.inspection import format_summary
from optimum_olica.olica import _update_folds
from optimum_olica.olica_math import StreamingMoments
from optimum_olica.pruner import calibration_batch_size

pytestmark = pytest.mark.usefixtures("single_thread")


def test_first_tokens_follow_the_models_own_distribution_whatever_its_generation_defaults():
    # A checkpoint's generation_config (here a low temperature and top-p, as chat models ship) must not narrow the
    # samples: the first sampled token's frequencies must match softmax(logits after BOS) with EOS excluded.
    model = make_tiny_model("llama_gqa", initializer_range=0.05)
    model.generation_config.temperature, model.generation_config.top_p = 0.2, 0.5
    model.generation_config.do_sample = True
    samples = generate_calibration_ids(model, None, num_samples=4000, sequence_length=1, seed=0, batch_size=4000)
    with torch.no_grad():
        logits = model(torch.tensor([[model.config.bos_token_id]])).logits[0, -1].double()
    logits[model.config.eos_token_id] = -float("inf")
    expected = torch.softmax(logits, dim=-1)
    observed = torch.bincount(samples[:, 0], minlength=expected.numel()).double() / samples.shape[0]
    total_variation = 0.5 * (observed - expected).abs().sum().item()
    # Sampling noise alone: about 0.5 * sum sqrt(2 p / (pi n)) ~ 0.07 here; a temperature of 0.2 or top-p of 0.5 moves
    # the distribution by far more than that (checked: > 0.3).
    assert total_variation < 0.12, total_variation
    assert expected[samples[:, 0]].min() > 0


def test_generated_windows_are_reproducible_full_length_and_leave_the_global_rng_alone():
    model = make_tiny_model("qwen2")
    state = torch.get_rng_state()
    first = generate_calibration_ids(model, None, num_samples=5, sequence_length=12, seed=3, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    again = generate_calibration_ids(model, None, num_samples=5, sequence_length=12, seed=3, batch_size=2)
    other = generate_calibration_ids(model, None, num_samples=5, sequence_length=12, seed=4, batch_size=2)
    assert first.shape == (5, 12) and first.dtype == torch.long
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not (first == model.config.eos_token_id).any()  # suppressed: every window is full length


def test_mixing_alternates_sources_and_the_refit_folds_take_one_source_each():
    data = torch.arange(0, 60).reshape(6, 10)
    generated = torch.arange(100, 140).reshape(4, 10)
    mixed = mix_calibration_ids(data, generated)
    assert torch.equal(mixed[0:8:2], data[:4]) and torch.equal(mixed[1:8:2], generated)
    assert torch.equal(mixed[8:], data[4:])
    # Batches as the pruner cuts them, for a sequence length whose plain token budget gives an odd batch (4096 // 80
    # = 51): each fold must still see one source only.
    sequence_length = 80
    batch = calibration_batch_size(sequence_length)
    sources = torch.tensor([0.0, 1.0]).repeat(60)[:, None, None]  # (sequence, token, feature): 0 data, 1 generated
    folds = [StreamingMoments(1, gram=True, target_dim=1, dtype=torch.float64) for _ in range(2)]
    for start in range(0, len(sources), batch):
        _update_folds(folds, sources[start:start + batch], sources[start:start + batch])
    assert folds[0].gram.item() == 0.0 and folds[1].gram.item() == folds[1].count == 60


@pytest.fixture(scope="module")
def tokenizer():
    """The real SmolLM2 tokenizer (from the cached conversion of the default model): text sources need one."""
    from transformers import AutoTokenizer

    from optimum_olica.default_model import default_model_path

    try:
        return AutoTokenizer.from_pretrained(default_model_path())
    except ImportError as error:
        pytest.skip(str(error))


def test_the_pruner_draws_mixes_and_reports_self_generated_sequences(tokenizer):
    model = make_tiny_model("llama_gqa", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    pruner = OlicaPruner(model, tokenizer)
    # The vocabulary holds nearly all parameters: the parts are pinned (ratio is then only informative).
    config = OlicaConfig(qk_ratio=0.25, vo_ratio=0.25, ffn_ratio=0.25, num_samples=6, sequence_length=16, seed=2,
                         self_calibration=0.5)
    expected = mix_calibration_ids(get_calibration_dataset(tokenizer, "austen", 3, 16, seed=2),
                                   generate_calibration_ids(model, tokenizer, 3, 16, seed=2))
    assert torch.equal(pruner.calibration_input_ids(config), expected)
    before = model.num_parameters()
    assert pruner.prune(config, progress=False).num_parameters() < before
    report = pruner.report["calibration_data"]
    assert (report["source"], report["self_generated_samples"], report["num_samples"]) == ("austen", 3, 6)
    assert report["generation_s"] > 0


def test_all_self_generated_reads_no_data_and_token_ids_cannot_be_mixed_into():
    model = make_tiny_model("llama_gqa")
    pruner = OlicaPruner(model)  # no tokenizer: no text could be read
    config = OlicaConfig(ratio=0.2, num_samples=4, sequence_length=16, self_calibration=1.0)
    assert torch.equal(pruner.calibration_input_ids(config), generate_calibration_ids(model, None, 4, 16, seed=0))
    pruner.prune(config, progress=False)
    assert pruner.report["calibration_data"]["source"] == "self-generated"
    with pytest.raises(OlicaError, match="cannot be applied to calibration token ids"):
        OlicaPruner(make_tiny_model("llama_gqa")).prune(
            OlicaConfig(self_calibration=0.5), torch.randint(3, 128, (4, 16)), progress=False
        )


@pytest.mark.parametrize("value", [-0.1, 1.5, "half", True])
def test_self_calibration_outside_zero_one_is_refused(value):
    with pytest.raises(OlicaConfigError, match="self_calibration"):
        OlicaConfig(self_calibration=value)


def _tiny_model_for(tokenizer):
    return make_tiny_model("llama_gqa", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)


# The vocabulary holds nearly all of a tiny model's parameters: the parts are pinned (ratio is then informative only).
SMALL = {"qk_ratio": 0.25, "vo_ratio": 0.25, "ffn_ratio": 0.25, "num_samples": 4, "sequence_length": 16}


def test_auto_mixes_the_models_own_text_into_the_bundled_text_and_records_the_share(tokenizer, tmp_path):
    model = _tiny_model_for(tokenizer)
    expected = mix_calibration_ids(get_calibration_dataset(tokenizer, "austen", 2, 16, seed=0),
                                   generate_calibration_ids(model, tokenizer, 2, 16, seed=0))
    pruner = OlicaPruner(model, tokenizer)
    config = OlicaConfig(**SMALL)
    assert config.self_calibration == "auto"
    assert torch.equal(pruner.calibration_input_ids(config), expected)
    pruner.prune(config, save_directory=tmp_path / "pruned", progress=False)
    assert pruner.report["calibration_data"]["self_generated_samples"] == 2
    assert OlicaConfig.from_pretrained(tmp_path / "pruned").self_calibration == 0.5  # the share used, not 'auto'
    assert pruner.pruned_model.config.olica_recipe["self_calibration"] == 0.5
    assert "2 of the sequences were written by the model itself" in build_model_card(tmp_path / "pruned").content
    assert "austen: 4 x 16 tokens = 64 tokens, seed 0, of which 2 sequences written by the model itself (generated in" \
        in format_summary(pruner.report)


@pytest.mark.parametrize("given", ["texts", "source"])
def test_auto_adds_the_models_own_text_to_data_of_the_users_own_for_what_is_cut(tokenizer, tmp_path, given):
    texts = ["The court held that the contract was void. " * 40] * 3
    (tmp_path / "own.txt").write_text(texts[0])
    config = OlicaConfig(**SMALL, calibration_source=str(tmp_path / "own.txt") if given == "source" else "austen")
    dataset = {"texts": texts, "source": None}[given]
    model = _tiny_model_for(tokenizer)
    # All 4 data windows stay, and the model writes half as many sequences more, alternating with them.
    expected = mix_calibration_ids(get_calibration_dataset(tokenizer, texts if given == "texts" else
                                                           str(tmp_path / "own.txt"), 4, 16, seed=0),
                                   generate_calibration_ids(model, tokenizer, 2, 16, seed=0))
    pruner = OlicaPruner(model, tokenizer)
    assert torch.equal(pruner.calibration_input_ids(config, dataset), expected)
    pruner.prune(config, dataset, progress=False)
    assert pruner.report["calibration_data"]["self_generated_samples"] == 2
    assert "the refits fit the data alone" in format_summary(pruner.report)
    recipe = pruner.pruned_model.config.olica_recipe
    assert (recipe["num_samples"], recipe["self_calibration"], recipe["refit_on"]) == (6, 2 / 6, "data")
    assert OlicaConfig(**{**SMALL, **recipe}).refit_sequence_mask().tolist() == [True, False, True, False, True, True]


def test_auto_uses_token_ids_given_to_the_pruner_as_they_are(tokenizer):
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    pruner = OlicaPruner(_tiny_model_for(tokenizer), tokenizer)
    assert torch.equal(pruner.calibration_input_ids(OlicaConfig(**SMALL), ids), ids)
    pruner.prune(OlicaConfig(**SMALL), ids, progress=False)
    assert "self_generated_samples" not in pruner.report["calibration_data"]
    assert pruner.pruned_model.config.olica_recipe["self_calibration"] == 0.0


def test_prune_model_uses_token_ids_as_they_are_under_auto():
    from optimum_olica import prune_model

    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    result = prune_model(make_tiny_model("llama_gqa"), OlicaConfig(**SMALL), ids, progress=False)
    assert result.model.config.olica_recipe["self_calibration"] == 0.0


@pytest.mark.parametrize("value", ["auto", 0, 0.25, 1])
def test_auto_and_shares_in_zero_one_are_accepted(value):
    config = OlicaConfig(self_calibration=value, num_samples=8)
    shares = {"auto": 0.5, 0: 0.0, 0.25: 0.25, 1: 1.0}
    assert config.resolve_self_calibration().self_calibration == shares[value]
    assert config.self_generated_samples() == round(8 * shares[value])
    own = config.resolve_self_calibration(own_data=True)
    if value == "auto":  # the data keeps its 8 windows; the model writes 4 more, which only inform what is cut
        assert (own.num_samples, own.self_generated_samples(), own.refit_on) == (12, 4, "data")
    else:
        assert own == config


def test_auto_generates_nothing_with_weights_offloaded(tokenizer, caplog):
    model = _tiny_model_for(tokenizer)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": "disk"}
    pruner = OlicaPruner(model, tokenizer)
    with caplog.at_level("INFO", logger="optimum_olica.pruner"):
        ids = pruner.calibration_input_ids(OlicaConfig(**SMALL))
    assert torch.equal(ids, get_calibration_dataset(tokenizer, "austen", 4, 16, seed=0))
    assert "offloaded" in caplog.text and "self_calibration=0.5" in caplog.text


def test_a_model_with_no_start_token_is_found_out_before_generating():
    from optimum_olica.self_calibration import has_start_token

    model = make_tiny_model("llama_gqa")
    assert has_start_token(model, None)
    model.config.bos_token_id = model.config.eos_token_id = None
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = None
    assert not has_start_token(model, None)
    config = OlicaConfig(ratio=0.2, num_samples=4, sequence_length=16, calibration_source="austen")
    with pytest.raises(OlicaError, match="no tokenizer"):  # 'auto' generates nothing and asks for the text's tokenizer
        OlicaPruner(model).calibration_input_ids(config)


@pytest.mark.parametrize("num_data, num_generated", [(3, 3), (5, 2), (2, 5), (4, 0), (0, 3)])
def test_the_data_mask_follows_the_mix(num_data, num_generated):
    from optimum_olica.self_calibration import data_sequence_mask

    mixed = mix_calibration_ids(torch.zeros(num_data, 4, dtype=torch.long), torch.ones(num_generated, 4, dtype=torch.long))
    assert torch.equal(data_sequence_mask(num_data, num_generated), mixed[:, 0] == 0)


def test_refit_on_data_fits_the_first_layer_on_the_data_sequences_alone():
    # Reference: the damped least squares of the first layer's o_proj, from a plain transformers forward over the data
    # sequences (the first layer's input is the embedding, the same in the dense and the pruned model), pulled
    # towards the same layer pruned without a refit.
    from optimum_olica import prune_model

    generator = torch.Generator().manual_seed(0)
    data, generated = torch.randint(3, 128, (8, 16), generator=generator), torch.randint(3, 128, (8, 16),
                                                                                          generator=generator)
    mixed = mix_calibration_ids(data, generated)
    recipe = {"ratio": 0.2, "num_samples": 16, "sequence_length": 16, "self_calibration": 0.5, "refit_damping": 0.1}
    on_data = prune_model(make_tiny_model("llama_gqa"), OlicaConfig(**recipe, refit_on="data"), mixed, progress=False)
    on_all = prune_model(make_tiny_model("llama_gqa"), OlicaConfig(**recipe), mixed, progress=False)
    unfitted = prune_model(make_tiny_model("llama_gqa"), OlicaConfig(**{**recipe, "refit_damping": None}), mixed,
                           progress=False)

    def first_layer(model, module: str, output: bool) -> torch.Tensor:
        attention = model.model.layers[0].self_attn
        captured = []
        if output:
            handle = attention.register_forward_hook(lambda m, a, out: captured.append(out[0]))
        else:
            handle = getattr(attention, module).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        with torch.no_grad():
            model(input_ids=data, use_cache=False)
        handle.remove()
        return captured[0].reshape(-1, captured[0].shape[-1]).double()

    features = first_layer(unfitted.model, "o_proj", output=False)
    targets = first_layer(make_tiny_model("llama_gqa"), "self_attn", output=True)
    prior = unfitted.model.model.layers[0].self_attn.o_proj.weight.double()
    gram = features.T @ features
    lam = 0.1 * gram.diagonal().mean()
    expected = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64),
                                  features.T @ targets + lam * prior.T).T
    fitted = on_data.model.model.layers[0].self_attn.o_proj.weight.double()
    torch.testing.assert_close(fitted, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(on_all.model.model.layers[0].self_attn.o_proj.weight.double(), expected, atol=1e-3)


def test_refit_on_data_needs_data_and_the_mix_it_describes():
    from optimum_olica import prune_model

    with pytest.raises(OlicaConfigError, match="leaves no data"):
        OlicaConfig(self_calibration=1.0, refit_on="data")
    with pytest.raises(OlicaConfigError, match="refit_on"):
        OlicaConfig(refit_on="generated")
    config = OlicaConfig(ratio=0.2, num_samples=16, sequence_length=16, self_calibration=0.5, refit_on="data")
    with pytest.raises(OlicaError, match="16 sequences mixed as mix_calibration_ids lays them out, but 8 were given"):
        prune_model(make_tiny_model("llama_gqa"), config, torch.randint(3, 128, (8, 16)), progress=False)
