"""SmolLM2-135M-Instruct end to end: prune 20%, save, reload, evaluate, generate (slow; `-m "not real_model"` skips it).

Calibration is kept small (16 x 64 tokens) and perplexity is measured on the first 4096 tokens of the evaluation text,
so the test runs in about 1.5 minutes on one CPU core. The quality bound is relative to the dense model on the same
tokens, measured here, so it holds whatever copy of the weights `default_model_path` converted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_olica  # noqa: F401  (registers the Auto classes)
from optimum_olica.configuration import OlicaConfig
from optimum_olica.data import tokenize_for_perplexity
from optimum_olica.default_model import default_model_path
from optimum_olica.evaluation import perplexity
from optimum_olica.pruner import REPORT_NAME, OlicaPruner

EVAL_TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_eval.txt"
EVAL_TOKENS = 4096
RATIO = 0.2
# The bound must fail without linear calibration, the part of the method that costs the most to get right. Measured
# on this protocol (16 x 64 calibration tokens, the first 4096 evaluation tokens, dense perplexity 32.50; seeds 0, 1,
# 2 of the calibration windows): the default recipe gives 1.40x, 1.41x and 1.44x the dense perplexity; the same recipe
# without the o_proj/down_proj refit (refit_damping=None) 1.62x, 1.69x and 1.69x. (On the full benchmark protocol,
# 128 x 128 tokens: 1.25x and 1.66x.) 1.55x keeps 11% headroom over the default's seed-0 figure, and is 5% below the
# best no-refit figure.
MAX_PERPLEXITY_FACTOR = 1.55


@pytest.fixture(scope="module")
def model_path() -> str:
    try:
        return default_model_path()
    except ImportError as error:
        pytest.skip(f"the default model is not installed: {error}")


@pytest.mark.real_model
def test_prune_save_reload_evaluate_generate(model_path, tmp_path):
    pruner = OlicaPruner.from_pretrained(model_path)
    assert pruner.tokenizer is not None
    eval_ids = tokenize_for_perplexity(pruner.tokenizer, EVAL_TEXT.read_text(encoding="utf-8"), EVAL_TOKENS)
    parameters_before = pruner.model.num_parameters()
    # Before pruning: prune() replaces the model's decoder layers in place.
    dense_perplexity = perplexity(pruner.model, eval_ids, sequence_length=128)
    assert math.isfinite(dense_perplexity)

    save_directory = tmp_path / "smollm2-olica-20"
    pruner.prune(
        OlicaConfig(ratio=RATIO, num_samples=16, sequence_length=64), save_directory=save_directory, progress=False
    )

    reloaded = AutoModelForCausalLM.from_pretrained(save_directory).eval()
    parameters_after = reloaded.num_parameters()
    achieved = 1 - parameters_after / parameters_before
    assert abs(achieved - RATIO) <= 0.005, f"{parameters_before:,} -> {parameters_after:,} ({achieved:.2%})"
    assert 106e6 < parameters_after < 109e6  # SmolLM2-135M (134.5M) at 20%: about 107.6M
    report = json.loads((save_directory / REPORT_NAME).read_text())
    assert report["parameters_after"] == parameters_after
    assert report["calibration_data"]["num_tokens"] == 16 * 64

    pruned_perplexity = perplexity(reloaded, eval_ids, sequence_length=128)
    factor = pruned_perplexity / dense_perplexity
    print(f"perplexity on {EVAL_TOKENS} tokens: dense {dense_perplexity:.2f}, pruned {pruned_perplexity:.2f} "
          f"({factor:.3f}x)")
    assert math.isfinite(pruned_perplexity)
    assert factor < MAX_PERPLEXITY_FACTOR, f"{factor:.3f}x the dense perplexity; without linear calibration: ~1.62x"

    tokenizer = AutoTokenizer.from_pretrained(save_directory)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        # min_new_tokens: this checks that generation runs and decodes, not that a lightly calibrated 20% cut still
        # answers well (it may end its turn at once); quality is what the perplexity bound is for.
        output = reloaded.generate(**inputs, min_new_tokens=8, max_new_tokens=12, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    print(f"generated: {text!r}")
    assert len(new_tokens) >= 8
    assert any(character.isalpha() for character in text), f"the pruned model generated no text: {text!r}"
