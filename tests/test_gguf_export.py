"""GGUF export for llama.cpp (`optimum_olica.export_to_gguf`, ``optimum-cli olica export --format gguf``).

References the code under test cannot share: the real llama.cpp (llama-cpp-python, built from source) running the
written file against transformers running the Olica model, on the same token ids (logits, greedy tokens, perplexity);
llama.cpp's own tokenizer against the Hugging Face one; the rotary reordering against both rotations written out here
entry by entry. The tests that run llama.cpp skip, with the reason, where llama-cpp-python is not installed
(``pip install 'optimum-olica[llamacpp]'``; ``make install`` builds it).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_olica import export_to_gguf
from optimum_olica.checkpoint import save_pruned_model
from optimum_olica.commands import main
from optimum_olica.conversion import zero_pad_ffn
from optimum_olica.evaluation import evaluation_token_ids, perplexity
from optimum_olica.gguf_export import interleave_rotary_halves

from conftest import EXPORTABLE_DIMENSIONS, TINY_FAMILIES, make_tiny_model, random_olica_model
from tiny_checkpoint import make_tiny_tokenizer

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install 'optimum-olica[llamacpp]'; make install builds it)",
)

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
TOKENIZER_TEXTS = [
    "Hello world",
    "It was 1813 when 42 cats ran  fast.\n\nNew paragraph",
    "naïve café, ünïcödé and 😀",
    "   leading spaces\tand a tab",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return make_tiny_tokenizer()


def tiny_olica_model(family: str, tokenizer, **dimensions):
    # llama.cpp's llama graph attends to the whole context: the tiny Mistral's 6-token window would differ on purpose
    # (test_sliding_window_is_warned_about covers that), so its parity run has no window.
    overrides = {"sliding_window": None} if family == "mistral" else {}
    base = make_tiny_model(family, vocab_size=len(tokenizer), **overrides)
    return random_olica_model(base.config, **{**EXPORTABLE_DIMENSIONS, **dimensions})


def llama_cpp_relative_error(model, path, tokenizer) -> float:
    """RMS of llama.cpp's logits minus transformers' on ``PROMPT``, over the RMS of transformers' logits."""
    token_ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([token_ids])).logits[0].double().numpy()
    llm = open_in_llama_cpp(path)
    try:
        actual = llama_cpp_logits(llm, token_ids)
    finally:
        llm.close()
    return float(np.sqrt(np.mean((actual - expected) ** 2) / np.mean(expected**2)))


def open_in_llama_cpp(path, n_ctx: int = 128, **kwargs):
    import llama_cpp

    # float32 KV cache: llama.cpp's default float16 cache would round keys and values (~1e-3 in the logits).
    return llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kwargs)


def llama_cpp_logits(llm, token_ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(token_ids)
    return np.array(llm.scores[: len(token_ids)], dtype=np.float64)


def llama_cpp_greedy(llm, token_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding through llama.cpp's KV cache, one token per step."""
    llm.reset()
    llm.eval(token_ids)
    generated = []
    for _ in range(new_tokens):
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(generated[-1:])
    return generated


def transformers_greedy(model, token_ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        output = model.generate(torch.tensor([token_ids]), max_new_tokens=new_tokens, do_sample=False,
                                min_new_tokens=new_tokens, pad_token_id=0)
    return output[0, len(token_ids):].tolist()


def llama_cpp_perplexity(llm, token_ids: list[int]) -> float:
    """exp(mean next-token NLL) of one window, the first token only context: `perplexity`'s protocol."""
    logits = llama_cpp_logits(llm, token_ids)[:-1]
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    return math.exp(-log_probs[np.arange(len(token_ids) - 1), token_ids[1:]].mean())


# ---- the rotary reordering against both rotations written out ------------------------------------------------------


def rotate_halves(vector: torch.Tensor, position: int, base: float = 10000.0) -> torch.Tensor:
    """transformers' RoPE on one head: channel j turns with channel j + d/2."""
    d = vector.shape[0]
    out = vector.clone()
    for j in range(d // 2):
        angle = position * base ** (-2 * j / d)
        a, b = vector[j].item(), vector[j + d // 2].item()
        out[j], out[j + d // 2] = a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)
    return out


def rotate_neighbours(vector: torch.Tensor, position: int, base: float = 10000.0) -> torch.Tensor:
    """llama.cpp's ``llama`` RoPE (normal mode) on one head: channel 2j turns with channel 2j + 1."""
    d = vector.shape[0]
    out = vector.clone()
    for j in range(d // 2):
        angle = position * base ** (-2 * j / d)
        a, b = vector[2 * j].item(), vector[2 * j + 1].item()
        out[2 * j], out[2 * j + 1] = a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)
    return out


def test_interleaved_rows_give_llama_cpp_the_same_attention_scores():
    heads, head_dim, hidden = 2, 8, 5
    generator = torch.Generator().manual_seed(0)
    q_weight, k_weight = torch.randn(heads * head_dim, hidden, generator=generator), torch.randn(
        heads * head_dim, hidden, generator=generator)
    q_bias = torch.randn(heads * head_dim, generator=generator)
    x_query, x_key = torch.randn(hidden, generator=generator), torch.randn(hidden, generator=generator)
    hf_q, hf_k = q_weight @ x_query + q_bias, k_weight @ x_key
    cpp_q = interleave_rotary_halves(q_weight, heads) @ x_query + interleave_rotary_halves(q_bias, heads)
    cpp_k = interleave_rotary_halves(k_weight, heads) @ x_key
    for head in range(heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        for query_position, key_position in ((3, 1), (7, 7), (11, 0)):
            hf_score = rotate_halves(hf_q[rows], query_position) @ rotate_halves(hf_k[rows], key_position)
            cpp_score = rotate_neighbours(cpp_q[rows], query_position) @ rotate_neighbours(cpp_k[rows], key_position)
            assert abs(hf_score.item() - cpp_score.item()) < 1e-4 * (1 + abs(hf_score.item()))


# ---- tiny models of every family through the real llama.cpp ---------------------------------------------------------


@needs_llama_cpp
@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_llama_cpp_computes_what_transformers_computes(family, tiny_tokenizer, tmp_path, single_thread):
    """f32 GGUF in llama.cpp vs the Olica model in transformers: the same logits at every position and the same
    greedy continuation (decoded through llama.cpp's KV cache), with factored Q/K, narrowed value heads, FFN widths
    that differ between layers (the adaptive allocation's; zero-padded to the widest), randomised biases and norms;
    and llama.cpp tokenizes text as the Hugging Face tokenizer does."""
    model = tiny_olica_model(family, tiny_tokenizer, intermediate_sizes=[48, 24, 40])
    result = export_to_gguf(model, tmp_path / "tiny.gguf", "f32", tokenizer=tiny_tokenizer)
    assert result.stored_ffn_widths == ((48, 24, 40) if result.architecture == "deci" else (48, 48, 48))
    token_ids = tiny_tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([token_ids])).logits[0].double().numpy()
    llm = open_in_llama_cpp(result.path)
    try:
        np.testing.assert_allclose(llama_cpp_logits(llm, token_ids), expected, atol=1e-4, rtol=0)
        assert llama_cpp_greedy(llm, token_ids, 12) == transformers_greedy(model, token_ids, 12)
        for text in TOKENIZER_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tiny_tokenizer(text)["input_ids"], text
    finally:
        llm.close()
    assert result.architecture == {"qwen2": "qwen2", "qwen3": "qwen3"}.get(family, "deci")
    assert result.olica_parameters == model.num_parameters() and result.parameters > result.olica_parameters


def test_zero_padded_ffn_computes_the_same_function():
    """zero_pad_ffn against plain transformers: the stock model rebuilt with 13 zero neurons more per FFN gives the
    original model's logits (FFN biases randomised too)."""
    model = make_tiny_model("llama_bias")
    width = model.config.intermediate_size + 13
    config = copy.deepcopy(model.config)
    config.intermediate_size = width
    padded = type(model)(config).eval()
    padded.load_state_dict(zero_pad_ffn(model.state_dict(), width))
    token_ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(padded(token_ids).logits, model(token_ids).logits, atol=1e-5, rtol=0)
    assert padded.model.layers[0].mlp.down_proj.weight.shape[1] == width


@needs_llama_cpp
def test_q8_0_pads_the_ffn_to_whole_blocks_and_quantizes_down_proj(tiny_tokenizer, tmp_path, single_thread):
    """An FFN of 48 neurons is not whole 32-value blocks: q8_0 stores the FFN padded to 64 neurons, every ffn_down in
    Q8_0 (not f16), and llama.cpp's logits stay those of transformers within q8_0's rounding."""
    from gguf import GGMLQuantizationType, GGUFReader

    model = tiny_olica_model("llama", tiny_tokenizer)
    result = export_to_gguf(model, tmp_path / "tiny-q8_0.gguf", "q8_0", tokenizer=tiny_tokenizer)
    assert (result.ffn_widths, result.stored_ffn_widths) == ((48,) * 3, (64,) * 3)
    assert "zero-padded from 48 to 64" in result.summary()
    reader = GGUFReader(result.path)
    down = [tensor for tensor in reader.tensors if tensor.name.endswith("ffn_down.weight")]
    assert down and all(tensor.tensor_type == GGMLQuantizationType.Q8_0 for tensor in down)
    assert all(int(tensor.shape[0]) == 64 for tensor in down)  # GGUF lists the row length first
    relative_error = llama_cpp_relative_error(model, result.path, tiny_tokenizer)
    # Measured: 0.021 padded, 0.020 with the FFN unpadded (down_proj then f16), 0.0009 for the f16 file: the random
    # tiny model's q8_0 rounding, which the padding does not change.
    assert relative_error < 0.03
    f16 = export_to_gguf(model, tmp_path / "tiny-f16.gguf", "f16", tokenizer=tiny_tokenizer)
    assert f16.stored_ffn_widths == (48,) * 3  # unpadded where nothing is quantized in blocks


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama_gqa", "qwen2"])
def test_per_layer_ffn_widths_are_stored_per_layer_where_llama_cpp_reads_them(family, tiny_tokenizer, tmp_path,
                                                                               single_thread):
    """A Llama whose FFN widths differ between layers is written as llama.cpp's 'deci' architecture with its own
    width in each layer (block-padded for q8_0); a Qwen2, whose graph reads one width, is padded to the widest. Both
    give transformers' logits within q8_0's rounding."""
    from gguf import GGUFReader

    model = tiny_olica_model(family, tiny_tokenizer, intermediate_sizes=[48, 24, 40])
    result = export_to_gguf(model, tmp_path / "tiny-q8_0.gguf", "q8_0", tokenizer=tiny_tokenizer)
    per_layer = family == "llama_gqa"
    assert result.architecture == ("deci" if per_layer else "qwen2")
    assert result.stored_ffn_widths == ((64, 32, 64) if per_layer else (64, 64, 64))
    reader = GGUFReader(result.path)
    down = {tensor.name: int(tensor.shape[0]) for tensor in reader.tensors if tensor.name.endswith("ffn_down.weight")}
    assert [down[f"blk.{layer}.ffn_down.weight"] for layer in range(3)] == list(result.stored_ffn_widths)
    assert ("stored per layer" in result.summary()) == per_layer
    assert llama_cpp_relative_error(model, result.path, tiny_tokenizer) < 0.03


# ---- refusals ------------------------------------------------------------------------------------------------------


def test_calibration_branches_are_refused_naming_the_layers(tiny_tokenizer, tmp_path):
    model = tiny_olica_model("llama_gqa", tiny_tokenizer, intermediate_sizes=[48, 40, 48], calibration_ranks=[0, 0, 4])
    with pytest.raises(ValueError, match=r"equivalent: layer 2 has a linear-calibration"):
        export_to_gguf(model, tmp_path / "x.gguf", tokenizer=tiny_tokenizer)
    assert not list(tmp_path.iterdir())


def test_other_families_are_refused(tiny_tokenizer, tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    model = Phi3ForCausalLM(Phi3Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=1, num_attention_heads=2, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2))
    with pytest.raises(ValueError, match="supports the Llama, Mistral, Qwen2 and Qwen3 families, not model_type='phi3'"):
        export_to_gguf(model, tmp_path / "x.gguf", tokenizer=tiny_tokenizer)


def test_a_bias_llama_cpp_would_not_read_is_refused_not_dropped(tiny_tokenizer, tmp_path):
    # Qwen3 with attention_bias has an o_proj bias; llama.cpp's qwen3 graph has no place for it.
    stock = make_tiny_model("qwen3", vocab_size=len(tiny_tokenizer), attention_bias=True)
    with pytest.raises(ValueError, match=r"'qwen3' architecture has no place for .*o_proj.bias"):
        export_to_gguf(stock, tmp_path / "x.gguf", tokenizer=tiny_tokenizer)


@needs_llama_cpp
def test_digits_split_before_byte_level_is_llama_cpp_smollm_and_tokenizes_alike(tmp_path):
    """The second pre-tokenizer recognised: each digit split off first (SmolLM's own tokenizer). llama.cpp, given the
    name the export picks, splits numbers as the Hugging Face tokenizer does."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Trained with GPT-2's splitting on text full of numbers, so the vocabulary has multi-digit tokens: llama.cpp
    # with the wrong name (gpt-2) would use them, the Hugging Face tokenizer (digits split first) never does.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([PROMPT + " In 1813, 2 or 345 pounds; 10,000 a year." * 50], trainer=trainer)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")
    assert any(len(token) > 1 and token.isdigit() for token in tokenizer.get_vocab())
    model = make_tiny_model("llama_gqa", vocab_size=len(tokenizer))
    result = export_to_gguf(model, tmp_path / "x.gguf", "f32", tokenizer=tokenizer)
    assert gguf.GGUFReader(result.path).fields["tokenizer.ggml.pre"].contents() == "smollm"
    llm = open_in_llama_cpp(result.path)
    try:
        for text in [*TOKENIZER_TEXTS, "In 1813, 2 or 345 pounds; 10,000 a year."]:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
    finally:
        llm.close()


def test_unrecognised_pretokenizer_is_refused_until_named(tiny_tokenizer, tmp_path):
    import gguf
    from tokenizers import Regex, pre_tokenizers

    tokenizer = make_tiny_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    model = make_tiny_model("llama_gqa", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="--tokenizer-pre NAME"):
        export_to_gguf(model, tmp_path / "x.gguf", tokenizer=tokenizer)
    result = export_to_gguf(model, tmp_path / "x.gguf", tokenizer=tokenizer, tokenizer_pre="llama-bpe")
    assert gguf.GGUFReader(result.path).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"


def test_tokenizers_that_are_not_byte_level_bpe_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    model = make_tiny_model("llama_gqa", vocab_size=8)
    with pytest.raises(ValueError, match="byte-level BPE tokenizers only; this one is 'WordLevel'"):
        export_to_gguf(model, tmp_path / "x.gguf", tokenizer=tokenizer)


def test_q4_k_m_without_llama_cpp_python_names_the_extra(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` meets where it is not installed
    model = tiny_olica_model("llama_gqa", tiny_tokenizer)
    with pytest.raises(ImportError, match=r"pip install 'optimum-olica\[llamacpp\]'"):
        export_to_gguf(model, tmp_path / "x.gguf", "q4_k_m", tokenizer=tiny_tokenizer)
    assert not list(tmp_path.iterdir())


def test_sliding_window_is_warned_about_only_where_transformers_applies_it(tiny_tokenizer, tmp_path, caplog):
    # Qwen3 (like Qwen2) carries a sliding_window it applies only with use_sliding_window, off here.
    qwen3 = make_tiny_model("qwen3", vocab_size=len(tiny_tokenizer), sliding_window=6)
    export_to_gguf(qwen3, tmp_path / "qwen3.gguf", "f32", tokenizer=tiny_tokenizer)
    assert "sliding window" not in caplog.text
    mistral = make_tiny_model("mistral", vocab_size=len(tiny_tokenizer))  # sliding_window=6
    export_to_gguf(mistral, tmp_path / "mistral.gguf", "f32", tokenizer=tiny_tokenizer)
    assert caplog.text.count("equal transformers' only for sequences up to 6 tokens") == 1


# ---- the command line ----------------------------------------------------------------------------------------------


@needs_llama_cpp
def test_cli_writes_a_gguf_llama_cpp_loads_and_prints_its_size(tiny_tokenizer, tmp_path, capsys):
    import gguf

    checkpoint = save_pruned_model(tiny_olica_model("qwen2", tiny_tokenizer), tmp_path / "olica",
                                   tokenizer=tiny_tokenizer)
    capsys.readouterr()
    main(["export", str(checkpoint), str(tmp_path / "tiny.gguf"), "--format", "gguf", "--quantize", "q8_0"])
    output = capsys.readouterr().out
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    stored = sum(int(np.prod(tensor.shape)) for tensor in reader.tensors)
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    # 48-wide down_proj rows are padded to 64: whole q8_0 blocks.
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    size = (tmp_path / "tiny.gguf").stat().st_size
    assert f"GGUF export   {stored:,} parameters, q8_0, {size / 2**20:,.1f} MiB" in output
    assert "FFN zero-padded from 48 to 64 neurons per layer" in output
    llm = open_in_llama_cpp(tmp_path / "tiny.gguf")
    llm.close()


# ---- SmolLM2 pruned by 20% -----------------------------------------------------------------------------------------


@needs_llama_cpp
@pytest.mark.real_model
def test_pruned_smollm2_in_llama_cpp(pruned_smollm2, tmp_path):
    """The pruned SmolLM2 at every quantization, through llama.cpp, against transformers on the same 256 held-out
    tokens: f32 gives the same greedy tokens, f16 the same perplexity within 1%; q8_0 and q4_k_m within bounds set
    from the figures measured (below); llama.cpp tokenizes as transformers does."""
    from optimum_olica.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(pruned_smollm2, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(pruned_smollm2)
    token_ids = evaluation_token_ids(tokenizer, num_tokens=256)
    expected = perplexity(model, token_ids, sequence_length=256)
    prompt = token_ids[0, :32].tolist()
    measured = {}
    for quantize in ("f32", "f16", "q8_0", "q4_k_m"):
        source = pruned_smollm2 if quantize == "f16" else model  # the folder (as the CLI reads it) and the model
        result = export_to_gguf(source, tmp_path / f"{quantize}.gguf", quantize, tokenizer=tokenizer)
        llm = open_in_llama_cpp(result.path, n_ctx=320)
        try:
            measured[quantize] = (llama_cpp_perplexity(llm, token_ids[0].tolist()), result.file_size)
            if quantize == "f32":
                assert llama_cpp_greedy(llm, prompt, 16) == transformers_greedy(model, prompt, 16)
                for text in TOKENIZER_TEXTS:
                    assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"]
        finally:
            llm.close()
        result.path.unlink()
    # Measured (2026-11-30, this fixture, 256 tokens, FFN 1160 padded to 1184 for q8_0/q4_k_m): transformers 28.291;
    # llama.cpp f32 28.291, f16 28.278 (-0.05%), q8_0 28.208 (-0.3%), q4_k_m 29.652 (+4.8%); files 461.9 MB, 231.9 MB
    # (0.502 of f32), 125.4 MB (0.272), 96.6 MB (0.209); without the padding q8_0 was 142.9 MB (0.309: down_proj f16).
    # The bounds leave headroom for another calibration draw; f32 and f16 are the issue's.
    print({"transformers": expected, **measured})
    assert abs(measured["f32"][0] / expected - 1) < 1e-3
    assert abs(measured["f16"][0] / expected - 1) < 0.01
    assert abs(measured["q8_0"][0] / expected - 1) < 0.02 and measured["q4_k_m"][0] / expected < 1.15
    f32_size = measured["f32"][1]
    assert measured["f16"][1] < 0.51 * f32_size and measured["q8_0"][1] < 0.29 * f32_size
    assert measured["q4_k_m"][1] < 0.23 * f32_size


def test_cli_refuses_gguf_flags_with_the_stock_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tmp_path), str(tmp_path / "stock"), "--quantize", "q8_0"])
    assert exit_.value.code == 1
    assert "--quantize and --tokenizer-pre apply to --format gguf only" in capsys.readouterr().err
