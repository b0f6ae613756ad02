"""Shared fixtures: tiny random models of every supported family, built from configs (no download)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# name -> (config class, model class, family-specific config values)
TINY_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 4}),
    "llama_gqa": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "llama_bias": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"num_key_value_heads": 2, "sliding_window": 6}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"num_key_value_heads": 2, "head_dim": 16, "attention_bias": False}),
}


def make_tiny_model(family: str = "llama_gqa", seed: int = 0, num_hidden_layers: int = 3, **overrides):
    """A random stock model of ``family`` small enough for unit tests (float32, eval mode).

    Weights are drawn with a larger standard deviation than the default 0.02, so logits are far from uniform and
    greedy decoding is not decided by rounding noise.
    """
    config_class, model_class, family_values = TINY_FAMILIES[family]
    values = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(family_values)
    values.update(overrides)
    config = config_class(**values)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        # RMSNorm weights start at one; perturb them so tests notice a norm applied to the wrong tensor.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    return model


@pytest.fixture(params=list(TINY_FAMILIES))
def tiny_family(request) -> str:
    return request.param


@pytest.fixture
def single_thread():
    """One intra-op thread: tiny matrices gain nothing from more, and on a busy 2-core machine they run much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Per-layer dimensions of a 3-layer tiny model with every module kind the Olica architecture adds and a stock form:
# Q and K factored in some layers, value heads narrowed in layers 1 and 2 (head_dim is 16), one reduced FFN width, no
# calibration branch (what the stock and GGUF exports undo, and what quantizers must handle).
EXPORTABLE_DIMENSIONS = {
    "query_ranks": [None, 10, 24],
    "key_ranks": [6, None, 12],
    "value_head_dims": [16, 8, 12],
    "intermediate_sizes": [48, 48, 48],
    "calibration_ranks": [0, 0, 0],
}


def random_olica_model(base_config, seed: int = 3, **dimensions):
    """An Olica model of ``base_config`` with the given per-layer dimensions and random weights, biases and norms
    (std 0.2): what pruning writes, minus the fit."""
    from optimum_olica.conversion import causal_lm_class_for, olica_config_from

    config = olica_config_from(base_config, **dimensions)
    torch.manual_seed(seed)
    model = causal_lm_class_for(config)(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="session")
def pruned_smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct pruned by 20% with the default recipe on 16 x 64 Austen tokens, saved with its tokenizer
    (about a minute on 2 cores); shared by the deployment tests (quantization, GGUF)."""
    from optimum_olica import OlicaConfig, OlicaPruner
    from optimum_olica.default_model import default_model_path

    try:
        path = default_model_path()
    except ImportError as error:
        pytest.skip(f"the default model is not installed: {error}")
    directory = tmp_path_factory.mktemp("smollm2") / "smollm2-olica-20"
    OlicaPruner.from_pretrained(path).prune(
        OlicaConfig(ratio=0.2, num_samples=16, sequence_length=64), save_directory=directory, progress=False
    )
    return directory


def forward_capturing(model, ids, hooks) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``ids`` with ``hooks`` ({name: (module, kind)}, kind 'input', 'output' or 'replace') and
    return what each captured (a module's first input, or its output). A 'replace' hook takes the module's input
    from the tensor given instead of the one the model computed."""
    captured, handles = {}, []
    for name, (module, kind, *replacement) in hooks.items():
        if kind == "input":
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: captured.__setitem__(name, a[0])))
        elif kind == "output":
            handles.append(module.register_forward_hook(
                lambda m, a, out, name=name: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out)))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, tensor=replacement[0]: (
                    ((tensor, *a[1:]), k) if a else (a, {**k, "hidden_states": tensor})),
                with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


# Lines other packages print at import, which our CLI's messages are checked without. optimum-cli imports every
# installed optimum subpackage's commands, and optimum-quanto 0.2.7 still imports `optimum.commands.
# BaseOptimumCLICommand`, gone in optimum 2.x. transformers imports torchao whenever it is installed; the CPU wheel
# of torchao 0.18 reports its missing CUDA extensions, and torch warns about two Enum registrations it makes.
UPSTREAM_NOISE = re.compile(
    r"An exception occurred while loading optimum\.quanto\.subpackage"
    r"|Failed to load .*/torchao/_C"
    r"|W\d{4} [\d:.]+ +\d+ .*torch/utils/_pytree\.py:\d+\] <enum '\w+'> is an Enum subclass"
)


def without_upstream_noise(stderr: str) -> str:
    return "".join(line for line in stderr.splitlines(keepends=True) if not UPSTREAM_NOISE.match(line))
