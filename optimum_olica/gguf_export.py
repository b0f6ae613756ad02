"""Export of an Olica-pruned (or stock) causal LM to one GGUF file that llama.cpp runs, tokenizer included.

The weights go through the exact stock conversion first (`optimum_olica.conversion.stock_state_dict`, via
``conversion.to_stock_model``): factored Q/K become dense, narrow value heads are zero-padded to ``head_dim`` and
narrower FFNs to the widest layer's width, so the GGUF has the one head size and the one FFN width llama.cpp's
``llama``/``qwen2``/``qwen3`` graphs read. Two layout
changes remain, both pure functions here:

- names: ``model.layers.<i>.self_attn.q_proj.weight`` -> ``blk.<i>.attn_q.weight``, ... (`gguf_tensor_name`);
- rotary layout (``llama`` architecture only): transformers rotates channel ``j`` of a head with channel
  ``j + head_dim / 2`` (``rotate_half``), llama.cpp's ``llama`` graph rotates adjacent channels ``2j, 2j + 1``. Moving
  query/key row ``j`` to ``2j`` and row ``j + head_dim / 2`` to ``2j + 1`` in every head (`interleave_rotary_halves`)
  makes the two compute the same scores; ``qwen2``/``qwen3`` rotate halves like transformers, so nothing moves.

The tokenizer is written from the checkpoint's own Hugging Face tokenizer (byte-level BPE only: llama.cpp's ``gpt2``
tokenizer model). llama.cpp names its pre-tokenizer regexes; `pretokenizer_name` recognises the Hugging Face
pre-tokenizers whose splitting equals one of them, and anything else must be named by the user (``tokenizer_pre``).

f32, f16 and q8_0 are written here with the ``gguf`` package (1-D norms and biases stay float32, as llama.cpp's own
converter stores them); q4_k_m is made from the f16 file by llama.cpp's own quantizer (``llama-cpp-python``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "GGUF_ARCHITECTURES",
    "QUANTIZATIONS",
    "GGUFExport",
    "export_to_gguf",
    "gguf_tensor_name",
    "gguf_tensors",
    "interleave_rotary_halves",
    "pretokenizer_name",
]

logger = logging.getLogger(__name__)

# transformers model_type of the stock family -> llama.cpp architecture.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp's graphs that read a per-layer FFN width, for the architectures above that have one: ``deci`` (made for
# NVIDIA's Nemotron-NAS models) is the ``llama`` graph with per-layer widths, the same tensors and the same rotary
# layout. Where there is none (qwen2, qwen3) every FFN is zero-padded to the widest layer's width.
PER_LAYER_FFN_ARCHITECTURES = {"llama": "deci"}
QUANTIZATIONS = ("f32", "f16", "q8_0", "q4_k_m")
# Values per block of the block formats: q8_0's blocks, and the blocks llama.cpp's k-quants fall back to (q5_0,
# q8_0) for rows that are not whole 256-value super-blocks; a row that is not whole 32-value blocks stays f16.
QUANTIZATION_BLOCK = 32
LLAMACPP_INSTALL = "pip install 'optimum-olica[llamacpp]'"
GGUF_INSTALL = "pip install 'optimum-olica[gguf]'"

# Per-layer transformers module -> GGUF tensor stem (llama.cpp's names, src/llama-arch.cpp).
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}
# Biases each llama.cpp graph adds (src/models/<arch>.cpp); a bias it would not read is refused, never dropped.
_READ_BIASES = {
    "llama": {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"},
    "deci": {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"},
    "qwen2": {"attn_q", "attn_k", "attn_v"},
    "qwen3": {"attn_q", "attn_k", "attn_v"},
}
# GGUF general.file_type (llama_ftype) of each quantization written here.
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}


def interleave_rotary_halves(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a query/key projection (weight ``(heads * head_dim, in)`` or bias ``(heads * head_dim,)``) reordered
    from transformers' rotary layout to llama.cpp's ``llama`` one: in each head, row ``j`` goes to ``2j`` and row
    ``j + head_dim / 2`` to ``2j + 1``, for ``j < head_dim / 2``."""
    rows = tensor.shape[0]
    if rows % num_heads or (rows // num_heads) % 2:
        raise ValueError(f"Cannot interleave {rows} rows as {num_heads} heads of an even width.")
    half = rows // num_heads // 2
    # (heads, 2 halves, half, ...) -> (heads, half, 2, ...): the two halves' j-th rows become neighbours.
    return tensor.reshape(num_heads, 2, half, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)


def gguf_tensor_name(name: str) -> str | None:
    """llama.cpp's name for the stock transformers tensor ``name`` (``None`` when it has none)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        return None
    module, kind = ".".join(parts[3:-1]), parts[-1]
    stem = _LAYER_TENSORS.get(module)
    return None if stem is None or kind not in ("weight", "bias") else f"blk.{parts[2]}.{stem}.{kind}"


def gguf_tensors(state_dict, config, architecture: str) -> dict[str, torch.Tensor]:
    """The GGUF tensors of a stock model's ``state_dict``: llama.cpp's names, rotary rows interleaved for the
    ``llama`` architecture, the tied ``lm_head`` left out (llama.cpp reuses ``token_embd`` when ``output`` is absent).

    Raises:
        ValueError: a tensor llama.cpp's graph for ``architecture`` would not read (named), so nothing is dropped.
    """
    tensors, unread = {}, []
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        target = gguf_tensor_name(name)
        stem = None if target is None else target.split(".")[-2]
        if target is None or (target.endswith(".bias") and stem not in _READ_BIASES[architecture]):
            unread.append(name)
            continue
        if architecture in ("llama", "deci") and stem in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if stem == "attn_q" else config.num_key_value_heads
            tensor = interleave_rotary_halves(tensor, heads)
        tensors[target] = tensor
    if unread:
        raise ValueError(
            f"llama.cpp's {architecture!r} architecture has no place for {', '.join(unread[:6])}"
            f"{' ...' if len(unread) > 6 else ''}: exporting would drop them and change the outputs. Export to stock "
            "(--format stock) and serve that with transformers or vLLM instead."
        )
    return tensors


def storage_type(shape: tuple[int, ...], quantize: str):
    """The GGML type a tensor is stored in: norms and biases (1-D) in float32 at every quantization, as llama.cpp's
    converter does; matrices in f16 or q8_0 when asked, q8_0 only for rows made of whole 32-value blocks (else f16)."""
    from gguf import GGMLQuantizationType

    if quantize == "f32" or len(shape) == 1:
        return GGMLQuantizationType.F32
    if quantize == "q8_0" and shape[-1] % QUANTIZATION_BLOCK == 0:
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16


def _rope_theta(config) -> float:
    """RoPE base frequency; only unscaled RoPE is exported (a scaled one needs llama.cpp metadata not written here)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default" or getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError(
            f"The model uses RoPE type {rope_type!r}; the GGUF export writes only unscaled RoPE. Export to stock "
            "(--format stock) and convert that with llama.cpp's convert_hf_to_gguf.py."
        )
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("The model config has no rope_theta; cannot write llama.cpp's rope.freq_base.")
    return float(theta)


def architecture_of(config) -> str:
    """llama.cpp's architecture for a stock config, refusing families and shapes it cannot represent exactly."""
    architecture = GGUF_ARCHITECTURES.get(config.model_type)
    if architecture is None:
        raise ValueError(
            f"GGUF export supports the Llama, Mistral, Qwen2 and Qwen3 families, not model_type="
            f"{config.model_type!r}. Export to stock (--format stock) and convert that with llama.cpp's "
            "convert_hf_to_gguf.py, which knows more families."
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if architecture == "qwen2" and head_dim * config.num_attention_heads != config.hidden_size:
        raise ValueError(
            f"llama.cpp's qwen2 architecture needs head_dim * num_attention_heads == hidden_size; this model has "
            f"{head_dim} * {config.num_attention_heads} != {config.hidden_size}."
        )
    # Mistral applies sliding_window when set; Qwen2/Qwen3 carry one but apply it only with use_sliding_window.
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        logger.warning(
            "The model attends within a sliding window of %d tokens; llama.cpp's %r architecture attends to the "
            "whole context, so its outputs equal transformers' only for sequences up to %d tokens.",
            window, architecture, window,
        )
    return architecture


# ---- tokenizer ------------------------------------------------------------------------------------------------------


def _byte_level(pre_tokenizer: dict | None, use_regex: bool) -> bool:
    """Whether ``pre_tokenizer`` is transformers' ByteLevel without a prefix space, splitting with GPT-2's regex
    (``use_regex``) or not."""
    return (
        isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "ByteLevel"
        and not pre_tokenizer.get("add_prefix_space", False) and pre_tokenizer.get("use_regex", True) == use_regex
    )


def is_byte_level_bpe(tokenizer_json: dict) -> bool:
    """Whether a ``tokenizer.json`` is a byte-level BPE (the only kind written: llama.cpp's ``gpt2`` model)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return tokenizer_json.get("model", {}).get("type") == "BPE" and any(
        isinstance(part, dict) and part.get("type") == "ByteLevel" for part in parts
    )


def pretokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` whose splitting equals this ``tokenizer.json``'s, or ``None`` if none is
    known to be equal (the caller must then be told the name).

    Recognised: GPT-2's byte-level regex alone (``gpt-2``), and single digits split off before it (``smollm``: its
    regex list in llama.cpp's src/llama-vocab.cpp is ``\\p{N}`` then GPT-2's). Both need no normalizer and a BPE that
    applies its merges (``ignore_merges`` would skip them for words in the vocabulary).
    """
    model = tokenizer_json.get("model", {})
    if tokenizer_json.get("normalizer") or model.get("type") != "BPE" or model.get("ignore_merges"):
        return None
    pre = tokenizer_json.get("pre_tokenizer")
    if _byte_level(pre, use_regex=True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0] == {"type": "Digits", "individual_digits": True}
            and _byte_level(parts[1], use_regex=True)):
        return "smollm"
    return None


def _merges(tokenizer_json: dict) -> list[str]:
    """BPE merges as GGUF stores them, ``"left right"`` (tokenizer.json has that form or ``[left, right]``)."""
    merges = tokenizer_json["model"].get("merges") or []
    pairs = [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in merges]
    if any(" " in part for pair in pairs for part in pair):
        raise ValueError("The tokenizer has merges with a literal space; byte-level BPE never has: not exportable.")
    return [f"{left} {right}" for left, right in pairs]


def _adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer adds its BOS / EOS token to a plain text (asked of the tokenizer itself)."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bos is not None and ids[:1] == [bos], eos is not None and ids[-1:] == [eos]


def write_tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> None:
    """The ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` entries of a byte-level BPE tokenizer: tokens by id
    (padded with unused ``[PAD<id>]`` entries up to the embedding's ``vocab_size``), their types (special added tokens
    are control tokens), merges, special ids, whether BOS/EOS are added, and the chat template."""
    from gguf import TokenType

    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if len(tokens) > vocab_size or any(token is None for token in tokens):
        raise ValueError(
            f"The tokenizer has {len(tokens)} token ids (with gaps or beyond the model's vocab_size {vocab_size}): "
            "it does not belong to this model."
        )
    added = tokenizer.added_tokens_decoder
    types = [
        (TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED) if index in added else TokenType.NORMAL
        for index in range(len(tokens))
    ]
    padding = range(len(tokens), vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens + [f"[PAD{index}]" for index in padding])
    writer.add_token_types(types + [TokenType.UNUSED] * len(padding))
    writer.add_token_merges(_merges(tokenizer_json))
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    adds_bos, adds_eos = _adds_special(tokenizer)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)


def resolve_pretokenizer(tokenizer, tokenizer_pre: str | None) -> str:
    """The ``tokenizer.ggml.pre`` to write: the user's, else the one `pretokenizer_name` recognises.

    Raises:
        ValueError: the tokenizer is not a byte-level BPE, or its pre-tokenizer is not recognised and none was given.
    """
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    if not is_byte_level_bpe(tokenizer_json):
        raise ValueError(
            f"The GGUF export writes byte-level BPE tokenizers only; this one is "
            f"{tokenizer_json.get('model', {}).get('type')!r} with pre-tokenizer "
            f"{(tokenizer_json.get('pre_tokenizer') or {}).get('type')!r}. Export to stock (--format stock) and "
            "convert that with llama.cpp's convert_hf_to_gguf.py."
        )
    if tokenizer_pre:
        return tokenizer_pre
    name = pretokenizer_name(tokenizer_json)
    if name is None:
        raise ValueError(
            "Cannot tell which llama.cpp pre-tokenizer splits text like this tokenizer "
            f"(pre_tokenizer {json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]}); a wrong one tokenizes text "
            "differently. Name it: --tokenizer-pre NAME (tokenizer_pre=NAME), e.g. llama-bpe for Llama 3, qwen2 for "
            "Qwen2/Qwen3: the name llama.cpp's convert_hf_to_gguf.py writes for the base model."
        )
    return name


# ---- writing ---------------------------------------------------------------------------------------------------------


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(f"The GGUF export needs the `gguf` package: {GGUF_INSTALL}.") from None
    return gguf


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ImportError(
            f"q4_k_m is made by llama.cpp's own quantizer, which needs llama-cpp-python: {LLAMACPP_INSTALL} "
            "(it compiles llama.cpp: minutes). f32, f16 and q8_0 need only the gguf package."
        ) from None
    return llama_cpp


def _write_hyperparameters(writer, config, ffn_widths: list[int], quantize: str, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(ffn_widths[0] if len(set(ffn_widths)) == 1 else list(ffn_widths))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    # One head size for keys, values and RoPE: what the stock conversion guarantees and llama.cpp asserts.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPES[quantize])
    if quantize == "q8_0":
        writer.add_quantization_version(2)  # GGML_QNT_VERSION


def write_gguf(path: Path, architecture: str, config, ffn_widths: list[int], tensors, tokenizer, pre: str,
               quantize: str, name: str) -> None:
    """One GGUF file at ``path``: hyperparameters (``ffn_widths``: one per layer, written as one value when they are
    equal), tokenizer, then every tensor in its `storage_type`."""
    gguf = _import_gguf()
    writer = gguf.GGUFWriter(path, architecture)
    _write_hyperparameters(writer, config, ffn_widths, quantize, name)
    write_tokenizer(writer, tokenizer, config.vocab_size, pre)
    for tensor_name, tensor in tensors.items():
        array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        kind = storage_type(array.shape, quantize)
        writer.add_tensor(tensor_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_with_llama_cpp(source: Path, target: Path, quantize: str) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``) from the f16 file ``source`` to ``target``."""
    llama_cpp = _import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FILE_TYPES[quantize]
    params.nthread = os.cpu_count() or 1
    with tempfile.TemporaryFile() as log, _c_output_to(log):
        status = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(target), ctypes.byref(params))
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    if status != 0:
        raise RuntimeError(
            f"llama.cpp's quantizer failed ({quantize}, status {status}) on {source}; its last lines:\n"
            + "\n".join(lines[-10:])
        )
    fallbacks = [line for line in lines if "fallback quantization" in line]
    if fallbacks:  # e.g. rows not made of whole 256-value blocks: llama.cpp picks another type for those tensors
        logger.info("llama.cpp: %s", fallbacks[-1].split(":", 1)[-1].strip())


@contextlib.contextmanager
def _c_output_to(file):
    """Send what C code prints to stdout/stderr (llama.cpp logs every tensor it quantizes) into ``file``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in saved:
            os.close(descriptor)


# ---- the export ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFExport:
    """What `export_to_gguf` wrote.

    Attributes:
        path: the GGUF file.
        architecture: llama.cpp's architecture (``llama``, ``deci`` for a Llama whose FFN widths differ between layers,
            ``qwen2``, ``qwen3``).
        quantize: ``f32``, ``f16``, ``q8_0`` or ``q4_k_m``.
        parameters: parameters stored in the file (a tied output matrix once).
        file_size: bytes on disk.
        olica_parameters: parameters of the Olica model it came from (``None`` for a stock model).
        tokenizer_pre: the llama.cpp pre-tokenizer written.
        ffn_widths: FFN neurons of each layer of the model exported.
        stored_ffn_widths: FFN neurons of each layer in the file: the widest layer's in every layer where the
            architecture reads one width (qwen2, qwen3), and for q8_0 and q4_k_m zero-padded to whole quantization
            blocks (exact; otherwise ``down_proj`` would stay f16).
    """

    path: Path
    architecture: str
    quantize: str
    parameters: int
    file_size: int
    olica_parameters: int | None
    tokenizer_pre: str
    ffn_widths: tuple[int, ...]
    stored_ffn_widths: tuple[int, ...]

    def summary(self) -> str:
        """The lines ``optimum-cli olica export --format gguf`` prints."""
        lines = []
        if self.olica_parameters is not None:
            lines.append(f"Olica model   {self.olica_parameters:,} parameters")
        lines += [
            (f"GGUF export   {self.parameters:,} parameters, {self.quantize}, {self.file_size / 2**20:,.1f} MiB "
             f"(llama.cpp architecture {self.architecture!r}, pre-tokenizer {self.tokenizer_pre!r})"),
            *self._ffn_lines(),
            f"Written to {self.path}: run it with llama.cpp (llama-cli -m {self.path.name}) or llama-cpp-python.",
        ]
        return "\n".join(lines)


    def _ffn_lines(self) -> list[str]:
        lines = []
        if len(set(self.ffn_widths)) > 1:
            lines.append(
                f"FFN widths differ between layers ({min(self.ffn_widths)} to {max(self.ffn_widths)} neurons): "
                + ("stored per layer (llama.cpp's 'deci' architecture, a Llama with per-layer widths)"
                   if self.architecture == "deci" else
                   f"llama.cpp's {self.architecture!r} graph reads one width, so every FFN is zero-padded to the "
                   "widest (the outputs are unchanged; prune with layer_allocation='uniform' for a smaller file)")
            )
        unpadded = _widest_where_one(self.ffn_widths, self.architecture)
        if list(self.stored_ffn_widths) != unpadded:
            lines.append(f"FFN zero-padded from {_widths_text(unpadded)} to {_widths_text(self.stored_ffn_widths)} "
                         f"neurons per layer, so that {self.quantize} quantizes down_proj in whole blocks (the outputs "
                         "are unchanged)")
        return lines


def _widths_text(widths) -> str:
    return str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}-{max(widths)}"


def _widest_where_one(widths, architecture: str) -> list[int]:
    """The FFN widths an architecture stores before block padding: per layer for ``deci``, else the widest."""
    return list(widths) if architecture == "deci" else [max(widths)] * len(widths)


def _stored_ffn_widths(widths: list[int], architecture: str, quantize: str) -> list[int]:
    """Each layer's FFN width in the file: `_widest_where_one`, then, for the block formats, rounded up to whole
    blocks of ``QUANTIZATION_BLOCK`` (zero-padded, exact: ``down_proj``'s rows then quantize instead of staying f16,
    a smaller file)."""
    stored = _widest_where_one(widths, architecture)
    if quantize in ("f32", "f16"):
        return stored
    return [-(-width // QUANTIZATION_BLOCK) * QUANTIZATION_BLOCK for width in stored]


def _output_file(output_file: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(output_file).expanduser().resolve()
    if path.suffix != ".gguf":
        raise ValueError(f"The GGUF export writes one file: give OUTPUT a .gguf name (got {path}).")
    if path.is_dir():
        raise FileExistsError(f"{path} is a folder; give the GGUF file's path.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True (--overwrite).")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _load(checkpoint_or_model, tokenizer):
    """``(model, tokenizer, name, llama.cpp architecture)``, refusing from config.json alone what cannot be exported, before any weight is
    loaded: a calibration branch (``to_base_config``, naming the layers), another family, scaled RoPE."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

    from .export import _checkpoint_folder
    from .loading import TOKENIZER_FILES, load_tokenizer
    from .modeling import OlicaDimensionsMixin

    is_model = isinstance(checkpoint_or_model, PreTrainedModel)
    folder = None if is_model else _checkpoint_folder(checkpoint_or_model)
    config = checkpoint_or_model.config if is_model else AutoConfig.from_pretrained(folder)
    stock_config = config.to_base_config() if isinstance(config, OlicaDimensionsMixin) else config
    architecture = architecture_of(stock_config)
    _rope_theta(stock_config)
    if tokenizer is None and folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ValueError(
            "A GGUF file carries its tokenizer and none was found: pass tokenizer= (the base model's tokenizer), "
            "or copy the base model's tokenizer files into the checkpoint folder."
        )
    model = checkpoint_or_model if is_model else AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    name = folder.name if folder is not None else getattr(config, "name_or_path", "") or type(model).__name__
    return model, tokenizer, Path(str(name)).name, architecture


def export_to_gguf(
    checkpoint_or_model,
    output_file: str | os.PathLike,
    quantize: str = "f16",
    *,
    tokenizer=None,
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
) -> GGUFExport:
    """Write an Olica-pruned (or stock) Llama, Mistral, Qwen2 or Qwen3 model as one GGUF file for llama.cpp.

    The weights are the exact stock export's (dense Q/K, value heads zero-padded to ``head_dim``, FFNs to the widest
    layer's), renamed and, for
    llama.cpp's ``llama`` architecture, with query/key rows in its rotary order; the tokenizer is included. For
    ``q8_0`` and ``q4_k_m`` an FFN width that is not a multiple of 32 is zero-padded to one (exact), so that
    ``down_proj`` quantizes instead of staying f16.

    Args:
        checkpoint_or_model: a local checkpoint folder (Olica or stock) or a causal LM.
        output_file: the ``.gguf`` file to write (atomically: a failed export leaves no file).
        quantize: ``f32``, ``f16``, ``q8_0`` (written here) or ``q4_k_m`` (llama.cpp's quantizer, from f16; needs
            ``llama-cpp-python``).
        tokenizer: the tokenizer to include (default: the checkpoint folder's own).
        tokenizer_pre: llama.cpp's pre-tokenizer name, for tokenizers whose splitting is not recognised.
        overwrite: replace an existing ``output_file``.

    Raises:
        ValueError: a calibration branch (naming the layers), another family, scaled RoPE,
            a tokenizer that is not byte-level BPE or whose pre-tokenizer is not recognised, an unknown quantization.
        ImportError: ``gguf`` missing, or ``llama-cpp-python`` missing for ``q4_k_m`` (the message names the extra).
        FileExistsError: ``output_file`` exists and ``overwrite`` is False.
    """
    from .conversion import stock_state_dict, zero_pad_ffn
    from .modeling import OlicaDimensionsMixin

    if quantize not in QUANTIZATIONS:
        raise ValueError(f"Unknown GGUF quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    _import_gguf()
    if quantize == "q4_k_m":
        _import_llama_cpp()  # before minutes of work, not after
    path = _output_file(output_file, overwrite)
    model, tokenizer, name, architecture = _load(checkpoint_or_model, tokenizer)
    pre = resolve_pretokenizer(tokenizer, tokenizer_pre)
    is_olica = isinstance(model.config, OlicaDimensionsMixin)
    config = model.config.to_base_config() if is_olica else model.config
    widths = list(model.config.intermediate_sizes) if is_olica else [config.intermediate_size] * config.num_hidden_layers
    if len(set(widths)) > 1:
        architecture = PER_LAYER_FFN_ARCHITECTURES.get(architecture, architecture)
    stored = _stored_ffn_widths(widths, architecture, quantize)
    state_dict = (stock_state_dict(model.state_dict(), model.config, stored) if is_olica
                  else zero_pad_ffn(model.state_dict(), stored[0]))
    tensors = gguf_tensors(state_dict, config, architecture)
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.tmp-", dir=path.parent) as staging:
        written = Path(staging) / path.name
        if quantize == "q4_k_m":
            unquantized = Path(staging) / "f16.gguf"
            write_gguf(unquantized, architecture, config, stored, tensors, tokenizer, pre, "f16", name)
            quantize_with_llama_cpp(unquantized, written, quantize)
        else:
            write_gguf(written, architecture, config, stored, tensors, tokenizer, pre, quantize, name)
        os.replace(written, path)
    parameters = sum(tensor.numel() for tensor in tensors.values())
    return GGUFExport(path, architecture, quantize, parameters, path.stat().st_size,
                      model.num_parameters() if is_olica else None, pre, tuple(widths), tuple(stored))
