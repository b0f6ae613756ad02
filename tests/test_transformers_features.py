"""transformers features on the pruned architecture, each against the same feature on a stock model or a plain run.

Loading refuses what stock transformers refuses; tensor parallelism equals one process; flash-attention is accepted
and gets value heads of the query/key width; peft's usual Llama target list adapts the factored projections; the
tokenizer of a pruned checkpoint loads without custom code; a quanto-quantized save is explained, not called corrupt.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_olica  # noqa: F401  (registers the Auto classes)
from optimum_olica.checkpoint import save_pruned_model
from optimum_olica.conversion import causal_lm_class_for, olica_config_from

from conftest import make_tiny_model
from test_modeling import REDUCED_DIMENSIONS, make_reduced_model

TESTS = Path(__file__).parent


def edit_config(checkpoint: Path, **values) -> None:
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


# ---- loading: a checkpoint that disagrees with its config ------------------------------------------------------


def test_vocabulary_mismatch_is_refused_like_stock_llama(tmp_path):
    """Defect 4: a wrong embedding shape was re-initialised silently, where stock Llama refuses it."""
    stock = make_tiny_model("llama_gqa")
    stock.save_pretrained(tmp_path / "stock")
    edit_config(tmp_path / "stock", vocab_size=100)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # the reference: stock transformers refuses
        AutoModelForCausalLM.from_pretrained(tmp_path / "stock")

    checkpoint = save_pruned_model(make_reduced_model("llama_gqa"), tmp_path / "pruned")
    edit_config(checkpoint, vocab_size=100)
    with pytest.raises(ValueError, match=r"`model\.embed_tokens\.weight`: checkpoint shape \(128, 64\), the config "
                                         r"gives \(100, 64\) \(vocab_size=100"):
        AutoModelForCausalLM.from_pretrained(checkpoint)


def test_ignore_mismatched_sizes_keeps_its_transformers_meaning(tmp_path):
    """``ignore_mismatched_sizes=True`` re-initialises the tensors of the wrong shape and loads the rest, as stock."""
    model = make_reduced_model("llama_gqa")
    checkpoint = save_pruned_model(model, tmp_path / "pruned")
    edit_config(checkpoint, vocab_size=100)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        checkpoint, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert reloaded.model.embed_tokens.weight.shape == (100, 64)
    assert {name for name, *_ in info["mismatched_keys"]} == {"model.embed_tokens.weight"}
    torch.testing.assert_close(reloaded.model.layers[1].self_attn.q_proj.up.weight,
                               model.model.layers[1].self_attn.q_proj.up.weight, atol=0, rtol=0)


def test_mismatch_in_a_layer_still_names_the_config_field(tmp_path):
    checkpoint = save_pruned_model(make_reduced_model("llama_gqa"), tmp_path / "pruned")
    edit_config(checkpoint, vocab_size=100, value_head_dims=[16, 8, 10])
    with pytest.raises(ValueError) as error:
        AutoModelForCausalLM.from_pretrained(checkpoint)
    message = str(error.value)
    assert "layer 2: `value_head_dims[2]`=10 disagrees with `model.layers.2.self_attn.v_proj.weight`" in message
    assert "`model.embed_tokens.weight`" in message


# ---- tensor parallelism ----------------------------------------------------------------------------------------


def make_pruned_checkpoint(family: str, directory: Path, **base_overrides) -> Path:
    """Factored Q (layers 1, 2) and K (layer 0), narrow values, a calibration branch; random weights and biases."""
    base = make_tiny_model(family, **base_overrides)
    config = olica_config_from(base.config, **REDUCED_DIMENSIONS)
    torch.manual_seed(3)
    model = causal_lm_class_for(config)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return save_pruned_model(model, directory)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_tensor_parallel_logits_equal_one_process(tmp_path):
    """Defect 5: ``tp_plan="auto"`` crashed on factored Q/K (the base family's plan made ``q_proj`` colwise)."""
    stock = tmp_path / "stock"
    make_tiny_model("llama_gqa").save_pretrained(stock)
    pruned = [make_pruned_checkpoint(family, tmp_path / family) for family in ("llama_bias", "qwen3")]
    mqa = make_pruned_checkpoint("llama", tmp_path / "mqa", num_key_value_heads=1)
    result_path = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TESTS / "tensor_parallel_worker.py"), str(result_path), str(stock), *map(str, pruned),
               "--mqa", str(mqa)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-6000:]
    results = json.loads(result_path.read_text())

    # The harness: a stock Llama (tied embeddings) under the same launch equals its single-process run.
    assert results[str(stock)]["max_difference"] < 1e-5
    for checkpoint in pruned:
        result = results[str(checkpoint)]
        assert result["max_difference"] < 1e-5, (checkpoint.name, result["max_difference"])
        rows = result["local_rows"]
        # Split by head: q/k up factors, dense q/k, narrow v_proj; the rank-r down factors stay whole.
        for name in ("model.layers.1.self_attn.q_proj.up.weight", "model.layers.0.self_attn.k_proj.up.weight",
                     "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                     "model.layers.1.mlp.gate_proj.weight"):
            local, full = rows[name]
            assert local * 2 == full, (checkpoint.name, name, local, full)
        for name in ("model.layers.1.self_attn.q_proj.down.weight", "model.layers.0.self_attn.k_proj.down.weight"):
            local, full = rows[name]
            assert local == full, (checkpoint.name, name, local, full)
        assert "Training under tensor parallelism is not supported" in result["train_error"]
    assert "num_key_value_heads=1 is not divisible by 2" in results["mqa_error"]


# ---- flash-attention and other fused kernels --------------------------------------------------------------------


def load_error(checkpoint: Path, **kwargs) -> Exception | None:
    try:
        AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    except Exception as error:  # noqa: BLE001  (the error itself is what is compared)
        return error
    return None


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_is_accepted_like_stock_llama(tmp_path, implementation):
    """Defect 6: the pruned model refused flash-attention ("does not support Flash Attention") where Llama accepts it.

    Without the kernel (this machine) both fail the same way, on the missing package; with it, both load.
    """
    stock = tmp_path / "stock"
    make_tiny_model("llama_gqa").save_pretrained(stock)
    checkpoint = save_pruned_model(make_reduced_model("llama_gqa"), tmp_path / "pruned")
    stock_error = load_error(stock, attn_implementation=implementation)
    pruned_error = load_error(checkpoint, attn_implementation=implementation)
    assert type(pruned_error) is type(stock_error), pruned_error
    assert str(pruned_error) == str(stock_error)


@pytest.fixture
def fake_fused_attention():
    """A kernel registered like a Hub kernel: records the shapes it gets, computes with SDPA."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name, calls = "olica_test_fused_attention", []

    def attention(module, query, key, value, attention_mask, **kwargs):
        calls.append({"layer": module.layer_idx, "key": tuple(key.shape), "value": tuple(value.shape)})
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    yield name, calls
    del AttentionInterface._global_mapping[name]
    del AttentionMaskInterface._global_mapping[name]


def test_fused_kernels_get_value_heads_padded_to_the_query_width(fake_fused_attention):
    """Every implementation but eager gets values as wide as keys (a fused kernel needs one head dim) and the
    output equals eager attention, which reads the narrow values as they are."""
    name, calls = fake_fused_attention
    model = make_reduced_model("llama_gqa")  # value_head_dims [16, 8, 12], head_dim 16
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 128, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    model.set_attn_implementation("eager")
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    model.set_attn_implementation(name)
    with torch.no_grad():
        actual = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert [call["layer"] for call in calls] == [0, 1, 2]
    for call in calls:
        assert call["value"] == call["key"] == (2, 2, 9, 16), call
    real_tokens = attention_mask[..., None].bool()
    torch.testing.assert_close(actual * real_tokens, expected * real_tokens, atol=1e-5, rtol=0)


# ---- peft ----------------------------------------------------------------------------------------------------------

LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_usual_lora_targets_name_dense_projections_and_the_factors_of_factored_ones():
    from optimum_olica import peft_target_modules

    model = make_reduced_model("llama_gqa")  # q_proj factored in layers 1, 2; k_proj in layer 0
    targets = peft_target_modules(model, LLAMA_LORA_TARGETS)
    attention = [name for name in targets if ".self_attn." in name]
    assert attention == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj.down", "model.layers.0.self_attn.k_proj.up",
        "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.q_proj.down", "model.layers.1.self_attn.q_proj.up", "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
        "model.layers.2.self_attn.q_proj.down", "model.layers.2.self_attn.q_proj.up", "model.layers.2.self_attn.k_proj",
        "model.layers.2.self_attn.v_proj", "model.layers.2.self_attn.o_proj",
    ]
    assert len(targets) - len(attention) == 3 * 3  # gate/up/down_proj of every layer, not the calibration branch
    with pytest.raises(ValueError, match=r"No module of OlicaLlamaForCausalLM is named \['q_porj'\]"):
        peft_target_modules(model, ["q_porj", "v_proj"])
    with pytest.raises(ValueError, match="is a string, which peft reads as a pattern"):
        peft_target_modules(model, "q_proj")


def test_lora_with_the_usual_llama_targets_trains_saves_and_reloads(tmp_path):
    """peft raised "Target module OlicaLowRankLinear is not supported" on the usual Llama list."""
    peft = pytest.importorskip("peft")
    from optimum_olica import peft_target_modules

    model = make_reduced_model("llama_gqa")
    checkpoint = save_pruned_model(model, tmp_path / "pruned")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=peft_target_modules(model, LLAMA_LORA_TARGETS))
    lora_model = peft.get_peft_model(model, config)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in lora_model.named_modules() if name.endswith(".lora_A")}
    assert "base_model.model.model.layers.1.self_attn.q_proj.up" in adapted
    assert "base_model.model.model.layers.1.self_attn.q_proj.down" in adapted
    assert "base_model.model.model.layers.0.self_attn.q_proj" in adapted

    torch.manual_seed(0)
    input_ids = torch.randint(3, 128, (4, 12))
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=1e-2)
    lora_model.train()
    losses = []
    for _ in range(6):
        loss = lora_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.2, losses
    lora_model.eval()
    with torch.no_grad():
        trained = lora_model(input_ids=input_ids).logits
    lora_model.save_pretrained(tmp_path / "adapter")

    fresh = AutoModelForCausalLM.from_pretrained(checkpoint)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, trained, atol=1e-6, rtol=0)
        # Merging keeps the factored format: the merged pruned model computes the adapted function.
        merged = reloaded.merge_and_unload()
        assert type(merged.model.layers[1].self_attn.q_proj).__name__ == "OlicaLowRankLinear"
        torch.testing.assert_close(merged(input_ids=input_ids).logits, trained, atol=1e-4, rtol=0)


# ---- optimum-quanto ------------------------------------------------------------------------------------------------

QUANTO_MESSAGE = r"holds \d+ optimum-quanto tensors .* saved with plain save_pretrained.* Nothing is corrupted"


def test_quanto_tensors_are_explained_not_called_corrupt(tmp_path):
    """quanto's state-dict names (`weight._data`, `weight._scale`, `input_scale`), written without quanto."""
    from safetensors.torch import load_file, save_file

    checkpoint = save_pruned_model(make_reduced_model("llama_gqa"), tmp_path / "pruned")
    weights = load_file(checkpoint / "model.safetensors")
    for name in [name for name in weights if ".mlp." in name and name.endswith(".weight")]:
        weight = weights.pop(name)
        weights[f"{name}._data"] = weight.to(torch.int8)
        weights[f"{name}._scale"] = torch.ones(weight.shape[0], 1)
        weights[name.replace(".weight", ".input_scale")] = torch.ones(())
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=QUANTO_MESSAGE) as error:
        AutoModelForCausalLM.from_pretrained(checkpoint)
    assert "corrupted or its config was edited" not in str(error.value)
    assert "QuantizedModelForCausalLM" in str(error.value)


def test_quanto_quantized_save_is_explained_and_quantos_own_format_reloads(tmp_path):
    quanto = pytest.importorskip("optimum.quanto")
    model = make_reduced_model("llama_gqa")
    input_ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))

    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=QUANTO_MESSAGE):
        AutoModelForCausalLM.from_pretrained(tmp_path / "plain")

    # What the message advises: quanto's own format, which keeps the quantization map beside the weights.
    quantized = quanto.QuantizedModelForCausalLM.quantize(make_reduced_model("llama_gqa"), weights=quanto.qint8)
    with torch.no_grad():
        expected = quantized(input_ids).logits
    quantized.save_pretrained(tmp_path / "quanto")
    reloaded = quanto.QuantizedModelForCausalLM.from_pretrained(tmp_path / "quanto")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, expected, atol=0, rtol=0)


# ---- the tokenizer of a pruned checkpoint, without the plugin -------------------------------------------------------


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_model_card_loads_tokenizer_and_model_without_the_plugin_and_without_a_prompt(tmp_path):
    """Without the plugin, AutoTokenizer read config.json, met its `auto_map` and asked "Do you wish to run the
    custom code? [y/N]" (a script waited for an answer); the card's snippet now passes trust_remote_code to it too.

    The snippet runs as printed, in a process where optimum_olica cannot be imported and stdin is closed, so a
    prompt shows up in the output instead of waiting.
    """
    from optimum_olica.hub import build_model_card

    from tiny_checkpoint import make_tiny_tokenizer, save_tiny_pruned_checkpoint

    checkpoint = save_tiny_pruned_checkpoint(tmp_path / "pruned")
    card = build_model_card(checkpoint).text
    without_plugin = python_blocks(card[card.index("Without the plugin"):])[0]
    assert "import optimum_olica" not in without_plugin
    text = "It is a truth universally acknowledged."
    script = (
        "import sys\nsys.modules['optimum_olica'] = None\n"
        + without_plugin.replace("path/to/this/checkpoint", checkpoint.as_posix())
        + f"print('IDS', tokenizer({text!r})['input_ids'])\nprint('MODEL', type(model).__name__)\n"
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL, cwd=tmp_path)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-3000:]
    assert "custom code" not in output, output[-3000:]
    assert f"IDS {make_tiny_tokenizer()(text)['input_ids']}" in process.stdout
    assert "MODEL OlicaLlamaForCausalLM" in process.stdout
