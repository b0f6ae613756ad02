"""Self-generated calibration data: token windows sampled from the model being pruned.

The idea is from "Self-calibration for Language Model Quantization and Pruning" (Williams, Chrysostomou and Aletras,
2024): text the model writes itself, from its beginning-of-sequence token, follows the distribution it learned, so
calibrating on it preserves what the model does in general rather than what one user corpus holds. It needs no data
and no network; its cost is one batched generation of ``num_samples x sequence_length`` tokens.

`generate_calibration_ids` samples the windows (plain ancestral sampling at a given temperature, no top-k/top-p, so
the samples follow the model's own distribution); `mix_calibration_ids` interleaves them with windows of the user's
data, one sequence from each in turn, so that the refit's two cross-validation folds (even and odd sequences, see
`olica._update_folds`) are one source each: the refit damping is then chosen on how well a fit on one distribution
carries over to the other.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["data_sequence_mask", "generate_calibration_ids", "mix_calibration_ids"]


def _start_token_id(model: Any, tokenizer: Any | None) -> int:
    """The token generation starts from: the tokenizer's or the model's BOS, else its EOS (a document boundary)."""
    for owner in (tokenizer, getattr(model, "config", None), getattr(model, "generation_config", None)):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    raise ValueError(
        "Cannot self-generate calibration data: neither the tokenizer nor the model config names a "
        "beginning-of-sequence (bos_token_id) or end-of-sequence (eos_token_id) token to start from. Set "
        "model.config.bos_token_id, or calibrate on text."
    )


def has_start_token(model: Any, tokenizer: Any | None) -> bool:
    """Whether generation has a token to start from (`_start_token_id` would not raise)."""
    try:
        _start_token_id(model, tokenizer)
    except ValueError:
        return False
    return True


def _check_arguments(num_samples: int, sequence_length: int, seed: int, temperature: float, batch_size: int) -> None:
    for name, value, minimum in (("num_samples", num_samples, 1), ("sequence_length", sequence_length, 1),
                                 ("seed", seed, 0), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 < temperature < float("inf"):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}.")


@torch.no_grad()
def generate_calibration_ids(
    model: Any,
    tokenizer: Any | None = None,
    num_samples: int = 128,
    sequence_length: int = 128,
    seed: int = 0,
    *,
    temperature: float = 1.0,
    batch_size: int = 32,
) -> torch.LongTensor:
    """Samples `num_samples` sequences of `sequence_length` tokens from the model itself.

    Each sequence starts from the beginning-of-sequence token (which is not part of the returned window) and is
    sampled token by token from the model's distribution at `temperature`, with no top-k or top-p cut and the
    end-of-sequence token suppressed, so every window is full length. The random stream is seeded with `seed` and
    forked (the caller's global RNG state is left as it was): the same model, arguments and device give the same
    tensor.

    Args:
        model: A causal LM with ``generate`` (a transformers ``PreTrainedModel``).
        tokenizer: Its tokenizer, read only for the start token (the model config's is used when None).
        num_samples: Number of sequences, >= 1.
        sequence_length: Tokens per sequence, >= 1.
        seed: Seed of the sampling, >= 0.
        temperature: Sampling temperature, > 0 (1.0: the model's own distribution).
        batch_size: Sequences generated together, >= 1 (see the note: it is part of what fixes the result).

    Returns:
        A `torch.long` tensor of shape `(num_samples, sequence_length)`, on the CPU.

    Note:
        The batches are generated in order from one seeded stream, so the result depends on `batch_size` as well
        as on `seed`; keep it fixed to reproduce a set.
    """
    _check_arguments(num_samples, sequence_length, seed, temperature, batch_size)
    from transformers import GenerationConfig

    start = _start_token_id(model, tokenizer)
    device = next(model.parameters()).device
    # A fresh generation config: a checkpoint's own defaults (a low temperature, top-p for chat) would narrow the
    # samples to the model's most likely text, which is what this data must not be.
    generation = GenerationConfig(
        do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0,
        max_new_tokens=sequence_length, min_new_tokens=sequence_length,
        pad_token_id=start, eos_token_id=_eos_ids(model, tokenizer), bos_token_id=start,
    )
    devices = [device] if device.type == "cuda" else []
    windows = []
    with torch.random.fork_rng(devices=devices), _eval_mode(model):
        torch.manual_seed(seed)
        for first in range(0, num_samples, batch_size):
            count = min(batch_size, num_samples - first)
            prompt = torch.full((count, 1), start, dtype=torch.long, device=device)
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=generation)
            windows.append(output[:, 1:1 + sequence_length].cpu())
    return torch.cat(windows)


def _eos_ids(model: Any, tokenizer: Any | None) -> list[int] | None:
    """Every end-of-sequence id the model may emit (suppressed until the window is full)."""
    ids = set()
    for owner in (tokenizer, getattr(model, "config", None), getattr(model, "generation_config", None)):
        value = getattr(owner, "eos_token_id", None) if owner is not None else None
        ids.update(value if isinstance(value, (list, tuple)) else [value] if isinstance(value, int) else [])
    return sorted(ids) or None


@contextlib.contextmanager
def _eval_mode(model: Any):
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def mix_calibration_ids(data_ids: torch.Tensor, generated_ids: torch.Tensor) -> torch.LongTensor:
    """Interleaves two calibration sets sequence by sequence: data, generated, data, generated, ...

    With equal counts, even positions hold the data and odd ones the generated text, which is how the refit splits its
    two cross-validation folds; the longer set's extra sequences go at the end.

    Args:
        data_ids: ``(n_data, sequence_length)`` token ids from the user's data.
        generated_ids: ``(n_generated, sequence_length)`` self-generated token ids.

    Returns:
        A ``(n_data + n_generated, sequence_length)`` `torch.long` tensor.
    """
    if data_ids.ndim != 2 or generated_ids.ndim != 2 or data_ids.shape[1] != generated_ids.shape[1]:
        raise ValueError(
            f"Both calibration sets must be (num_samples, sequence_length) with the same sequence length, got "
            f"{tuple(data_ids.shape)} and {tuple(generated_ids.shape)}."
        )
    paired = min(len(data_ids), len(generated_ids))
    # (paired, 2, length) -> (2 * paired, length): row 2i is data i, row 2i + 1 is generated i.
    interleaved = torch.stack([data_ids[:paired], generated_ids[:paired]], dim=1).flatten(0, 1)
    return torch.cat([interleaved, data_ids[paired:], generated_ids[paired:]]).long()


def data_sequence_mask(num_data: int, num_generated: int) -> torch.BoolTensor:
    """Which sequences of ``mix_calibration_ids(data, generated)`` are data (True) rather than self-generated."""
    for name, value in (("num_data", num_data), ("num_generated", num_generated)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
    paired = min(num_data, num_generated)
    return torch.cat([torch.tensor([True, False]).repeat(paired), torch.ones(num_data - paired, dtype=torch.bool),
                      torch.zeros(num_generated - paired, dtype=torch.bool)])
