"""Quantizing a pruned checkpoint: optimum-quanto int8 weights (quanto's own save format) and torchao int8
weight-only (transformers' ``TorchAoConfig``), on the Olica architecture's factored Q/K and narrow value heads.

References the quantizers cannot share: the float Olica model itself (every quantized weight must be an int8
rounding of its float weight, checked here entry by entry) and the float model given the dequantized weights (the
quantized model must compute what those weights compute, through every Olica module); on SmolLM2, the unquantized
pruned model's perplexity on the same tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_olica  # noqa: F401  (registers the Auto classes)
from optimum_olica.checkpoint import save_pruned_model

from conftest import EXPORTABLE_DIMENSIONS, make_tiny_model, random_olica_model
from oracle_probe import oracle_inputs

EVAL_TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_eval.txt"


def olica_checkpoint(directory: Path) -> Path:
    model = random_olica_model(make_tiny_model("llama_bias").config, **EXPORTABLE_DIMENSIONS)
    return save_pruned_model(model, directory)


def check_int8_rounding(weight: torch.Tensor, dequantized: torch.Tensor) -> None:
    """``dequantized`` is an int8 rounding of ``weight`` with one scale per output row: each row lies on a grid of
    its absmax / 127 (quanto) or / 127.5 (torchao: the int8 range's half width), within one step of the float weight
    (the quantizers differ from a plain round in where exact halves go)."""
    for divisor in (127.0, 127.5):
        scale = weight.abs().amax(dim=1, keepdim=True) / divisor
        levels = dequantized / scale
        if torch.allclose(levels, levels.round(), atol=1e-2):
            break
    else:
        raise AssertionError("the dequantized weight is not on a grid of its row's absmax / 127 or / 127.5")
    assert levels.round().abs().max() <= 128
    assert ((dequantized - weight).abs() <= scale * 1.001).all()


def with_weights(checkpoint: Path, weights: dict[str, torch.Tensor]):
    """The checkpoint's model in float32 with the named linear weights replaced."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in weights.items():
            modules[name].weight.copy_(weight)
    return model


def quantized_linears(model) -> dict[str, torch.nn.Module]:
    """Every linear layer a weight-only quantizer converts: all but the LM head (tied to the embeddings or not)."""
    return {name: module for name, module in model.named_modules()
            if name.startswith("model.layers.") and hasattr(module, "weight") and module.weight.dim() == 2}


# Modules only the Olica architecture has: factored Q/K halves (layers 1 and 2 here).
OLICA_MODULES = {"model.layers.1.self_attn.q_proj.down", "model.layers.1.self_attn.q_proj.up",
                 "model.layers.2.self_attn.k_proj.down", "model.layers.0.self_attn.k_proj.up"}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits * inputs["attention_mask"][..., None]


def test_torchao_int8_weight_only_quantizes_every_olica_projection_and_reloads(tmp_path):
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    checkpoint = olica_checkpoint(tmp_path / "olica")
    quantized = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    ).eval()
    modules = quantized_linears(quantized)
    assert OLICA_MODULES <= set(modules) and len(modules) == 3 * 7 + 4
    assert all(isinstance(module.weight, torchao.quantization.Int8Tensor) for module in modules.values())

    float_model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    float_modules = dict(float_model.named_modules())
    dequantized = {name: module.weight.dequantize() for name, module in modules.items()}
    for name, weight in dequantized.items():
        check_int8_rounding(float_modules[name].weight.detach(), weight)
    inputs = oracle_inputs()
    reference = logits(with_weights(checkpoint, dequantized), inputs)
    torch.testing.assert_close(logits(quantized, inputs), reference, atol=1e-4, rtol=0)
    assert (logits(quantized, inputs) - logits(float_model, inputs)).abs().max() > 1e-3  # the rounding is visible

    quantized.save_pretrained(tmp_path / "int8")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8").eval()
    assert torch.equal(logits(reloaded, inputs), logits(quantized, inputs))
    generated = reloaded.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, quantized.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0))


def test_quanto_int8_quantizes_every_olica_projection_and_reloads_in_its_own_format(tmp_path):
    quanto = pytest.importorskip("optimum.quanto")

    checkpoint = olica_checkpoint(tmp_path / "olica")
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    quantized = quanto.QuantizedModelForCausalLM.quantize(model, weights=quanto.qint8, exclude="lm_head")
    modules = quantized_linears(model)
    assert OLICA_MODULES <= set(modules) and len(modules) == 3 * 7 + 4
    assert all(isinstance(module, quanto.QLinear) for module in modules.values())

    float_modules = dict(AutoModelForCausalLM.from_pretrained(checkpoint).named_modules())
    dequantized = {name: module.qweight.dequantize().float() for name, module in modules.items()}
    for name, weight in dequantized.items():
        check_int8_rounding(float_modules[name].weight.detach(), weight)
    inputs = oracle_inputs()
    reference = logits(with_weights(checkpoint, dequantized), inputs)
    torch.testing.assert_close(logits(quantized, inputs), reference, atol=1e-4, rtol=0)

    quantized.save_pretrained(tmp_path / "int8")
    reloaded = quanto.QuantizedModelForCausalLM.from_pretrained(tmp_path / "int8")
    assert torch.equal(logits(reloaded, inputs), logits(quantized, inputs))


# ---- SmolLM2: quality after int8 ------------------------------------------------------------------------------------

EVAL_TOKENS = 2048
# Measured on this protocol (SmolLM2 pruned 20% on 16 x 64 tokens, the first 2,048 evaluation tokens, unquantized
# perplexity 42.07): quanto int8 1.0046x and torchao int8 1.0049x (on a 128 x 128-calibrated checkpoint and 4,096
# tokens: 1.009x and 1.008x). 1.03x leaves room for other calibrations and still fails a quantizer that breaks.
MAX_INT8_FACTOR = 1.03


@pytest.fixture(scope="module")
def smollm2_eval(pruned_smollm2):
    from transformers import AutoTokenizer

    from optimum_olica.data import tokenize_for_perplexity
    from optimum_olica.evaluation import perplexity

    tokenizer = AutoTokenizer.from_pretrained(pruned_smollm2)
    ids = tokenize_for_perplexity(tokenizer, EVAL_TEXT.read_text(encoding="utf-8"), EVAL_TOKENS)

    def measure(model) -> float:
        return perplexity(model, ids, sequence_length=128)

    unquantized = measure(AutoModelForCausalLM.from_pretrained(pruned_smollm2).eval())
    return measure, unquantized


@pytest.mark.real_model
def test_smollm2_int8_perplexity_stays_near_the_unquantized_model(pruned_smollm2, smollm2_eval, tmp_path):
    quanto = pytest.importorskip("optimum.quanto")
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    measure, unquantized = smollm2_eval
    quantized = quanto.QuantizedModelForCausalLM.quantize(
        AutoModelForCausalLM.from_pretrained(pruned_smollm2).eval(), weights=quanto.qint8, exclude="lm_head"
    )
    quantized.save_pretrained(tmp_path / "quanto")
    factors = {"quanto": measure(quanto.QuantizedModelForCausalLM.from_pretrained(tmp_path / "quanto"))}
    torchao_model = AutoModelForCausalLM.from_pretrained(
        pruned_smollm2, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    ).eval()
    factors["torchao"] = measure(torchao_model)
    factors = {name: value / unquantized for name, value in factors.items()}
    print(f"unquantized {unquantized:.2f}; int8 factors {factors}")
    assert all(math.isfinite(value) and value < MAX_INT8_FACTOR for value in factors.values()), factors
