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
_RESOURCES = "resources"
# name -> (file under optimum_olica/resources, what the text is). The first is in domain for the bundled Austen
# calibration text; the others are out of domain, so a model that only learned its calibration domain shows it.
# Evaluation only: never calibrate on them, and tune nothing to them (see resources/README.md).
BUNDLED_EVALUATION_TEXTS: dict[str, tuple[str, str]] = {
    HELD_OUT_SOURCE: ("heldout_pride_and_prejudice.txt", "the beginning of Pride and Prejudice (19th-century "
                      "fiction, in domain for the bundled Austen calibration text)"),
    "licenses": ("heldout_licenses.txt", "legal English: the GNU GPL v3, Apache 2.0, MPL 2.0 and GNU LGPL 2.1 "
                 "licence texts"),
    "python-stdlib": ("heldout_python_stdlib.txt", "Python source: CPython 3.11's argparse and textwrap modules"),
}
OUT_OF_DOMAIN_SOURCES = ("licenses", "python-stdlib")
DEFAULT_EVALUATION_SOURCES = (HELD_OUT_SOURCE, *OUT_OF_DOMAIN_SOURCES)


def held_out_text(name: str = HELD_OUT_SOURCE) -> str:
    """A bundled evaluation text, read from the package (no network).

    ``"pride-and-prejudice"`` (the default): the beginning of Pride and Prejudice (Project Gutenberg, public domain),
    about 140 KB, 35,000 SmolLM2 tokens. The bundled calibration text (``"austen"``) leaves this novel out on purpose,
    so perplexity measured on it is not measured on calibration data, but it is the calibration text's domain.
    ``"licenses"``: legal English (GNU GPL v3, Apache 2.0, MPL 2.0, GNU LGPL 2.1; verbatim copies), about 90 KB,
    19,000 tokens. ``"python-stdlib"``: Python source (CPython 3.11's argparse and textwrap, PSF License), about
    120 KB, 27,000 tokens. The last two are out of domain for the Austen text: they show whether a pruned model kept
    the model's general ability or only its calibration domain.

    Raises:
        ValueError: if ``name`` is not one of `BUNDLED_EVALUATION_TEXTS`.
    """
    import importlib.resources

    if name not in BUNDLED_EVALUATION_TEXTS:
        raise ValueError(
            f"No bundled evaluation text named {name!r}; the bundled texts are {', '.join(BUNDLED_EVALUATION_TEXTS)}."
        )
    resource = importlib.resources.files("optimum_olica").joinpath(_RESOURCES, BUNDLED_EVALUATION_TEXTS[name][0])
    return resource.read_text(encoding="utf-8")


def check_evaluation_source(source: str) -> None:
    """Refuses, before any model is loaded, an evaluation source name that can only be a typo.

    Accepted: a bundled text (`BUNDLED_EVALUATION_TEXTS`), ``"austen"``, a Hub shortcut (``"wikitext2"``, ``"c4"``),
    an existing local path, or a Hub dataset id of the form ``owner/name``. A bare word that is none of these is
    refused with the list of names (a bare word would otherwise be sent to the Hub and fail there, minutes later).

    Raises:
        ValueError: naming the closest valid name, if any.
    """
    import difflib
    import os

    from .data import BUNDLED_SOURCE, HUB_SHORTCUTS, _looks_like_path

    known = [*BUNDLED_EVALUATION_TEXTS, BUNDLED_SOURCE, *HUB_SHORTCUTS]
    if source in known or os.path.exists(os.path.expanduser(source)) or _looks_like_path(source) or "/" in source:
        return  # a path that does not exist is reported by the loader, with the path
    close = difflib.get_close_matches(source, known, n=1)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    raise ValueError(
        f"Unknown evaluation text {source!r}. {hint}Use a bundled text ({', '.join(BUNDLED_EVALUATION_TEXTS)}), "
        f"{BUNDLED_SOURCE!r}, {' or '.join(repr(name) for name in HUB_SHORTCUTS)}, a local file or folder, or a Hub "
        "dataset id (owner/name)."
    )


def evaluation_token_ids(
    tokenizer, source: str = HELD_OUT_SOURCE, *, num_tokens: int | None = None, split: str = "test"
) -> torch.Tensor:
    """The token ids of an evaluation text, ``(1, n)``, for `perplexity`.

    Args:
        tokenizer: the model's tokenizer (called without special tokens).
        source: a bundled text (``"pride-and-prejudice"``, the default; ``"licenses"``; ``"python-stdlib"``: see
            `held_out_text`), ``"wikitext2"`` (its test split with ``split="test"``: the paper's protocol), a local
            file or folder, a Hub dataset id, or ``"austen"`` (the calibration text itself: figures on it flatter the
            pruned model). Documents are joined with blank lines.
        num_tokens: keep only the first ``num_tokens`` tokens (None: all).
        split: the split of Hub datasets.
    """
    from .data import load_calibration_texts, tokenize_for_perplexity

    check_evaluation_source(source)
    if source in BUNDLED_EVALUATION_TEXTS:
        text = held_out_text(source)
    else:
        text = "\n\n".join(load_calibration_texts(source, split=split))
    return tokenize_for_perplexity(tokenizer, text, num_tokens)


def perplexities(model, token_ids_by_text: dict[str, torch.Tensor], **kwargs) -> dict[str, float]:
    """`perplexity` of ``model`` on each text: ``{name: token ids}`` -> ``{name: perplexity}``; ``kwargs`` go to
    `perplexity` (``sequence_length``, ``batch_size``, ``progress``)."""
    return {name: perplexity(model, token_ids, **kwargs) for name, token_ids in token_ids_by_text.items()}


def ratios_to_dense(pruned: dict[str, float], dense: dict[str, float]) -> dict[str, float]:
    """``{text: pruned perplexity / dense perplexity}`` for the texts both measured: how much of the dense model's
    quality each text keeps (1.0: none lost). Perplexities on different texts are not comparable; these ratios are."""
    return {name: pruned[name] / dense[name] for name in pruned if name in dense}


__all__ = [
    "BUNDLED_EVALUATION_TEXTS",
    "DEFAULT_EVALUATION_SOURCES",
    "HELD_OUT_SOURCE",
    "OUT_OF_DOMAIN_SOURCES",
    "check_evaluation_source",
    "evaluation_token_ids",
    "held_out_text",
    "perplexities",
    "perplexity",
    "ratios_to_dense",
]
