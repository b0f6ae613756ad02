"""Perplexity on non-overlapping windows, the protocol of the Olica paper's tables."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model,
    token_ids: torch.Tensor,
    *,
    sequence_length: int = 128,
    batch_size: int = 16,
    progress: bool = False,
) -> float:
    """exp(mean next-token negative log-likelihood) over non-overlapping windows of ``sequence_length`` tokens.

    Every window is scored independently (no context carried over), and its first token is only context, as in
    the paper's WikiText-2 protocol. A trailing partial window is dropped.

    Args:
        model: a causal LM.
        token_ids: ``(1, n)`` or ``(n,)`` token ids of the evaluation text.
        sequence_length: window length.
        batch_size: windows per forward pass.
        progress: show a progress bar.
    """
    flat = token_ids.reshape(-1)
    num_windows = flat.numel() // sequence_length
    if num_windows == 0:
        raise ValueError(
            f"The evaluation text has {flat.numel()} tokens, fewer than one window of sequence_length="
            f"{sequence_length}; use a longer text or a shorter sequence_length."
        )
    windows = flat[: num_windows * sequence_length].reshape(num_windows, sequence_length)
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":
        device = torch.device("cpu")
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, num_windows, batch_size), desc="perplexity", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


HELD_OUT_SOURCE = "pride-and-prejudice"
_HELD_OUT_RESOURCE = ("resources", "heldout_pride_and_prejudice.txt")


def held_out_text() -> str:
    """The bundled held-out evaluation text: the beginning of Pride and Prejudice (Project Gutenberg, public domain).

    The bundled calibration text (``"austen"``) leaves this novel out on purpose, so perplexity measured on it is not
    measured on calibration data. About 140 KB, 35,000 SmolLM2 tokens.
    """
    import importlib.resources

    return importlib.resources.files("optimum_olica").joinpath(*_HELD_OUT_RESOURCE).read_text(encoding="utf-8")


def evaluation_token_ids(
    tokenizer, source: str = HELD_OUT_SOURCE, *, num_tokens: int | None = None, split: str = "test"
) -> torch.Tensor:
    """The token ids of an evaluation text, ``(1, n)``, for `perplexity`.

    Args:
        tokenizer: the model's tokenizer (called without special tokens).
        source: ``"pride-and-prejudice"`` (the bundled held-out text, the default), ``"wikitext2"`` (its test split
            with ``split="test"``: the paper's protocol), a local file or folder, a Hub dataset name, or ``"austen"``
            (the calibration text itself: figures on it flatter the pruned model). Documents are joined with blank
            lines.
        num_tokens: keep only the first ``num_tokens`` tokens (None: all).
        split: the split of Hub datasets.
    """
    from .data import load_calibration_texts, tokenize_for_perplexity

    text = held_out_text() if source == HELD_OUT_SOURCE else "\n\n".join(load_calibration_texts(source, split=split))
    return tokenize_for_perplexity(tokenizer, text, num_tokens)


__all__ = ["HELD_OUT_SOURCE", "evaluation_token_ids", "held_out_text", "perplexity"]
