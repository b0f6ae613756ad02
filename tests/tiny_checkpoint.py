"""A tiny pruned checkpoint with a real tokenizer, for tests that run text through a pruned model (lm-eval, examples).

`make_tiny_tokenizer` trains a byte-level BPE tokenizer of 384 tokens on the start of the bundled Austen text (about
a second, offline, deterministic), so a `conftest.make_tiny_model` with a matching vocabulary can read text; its
special tokens take the ids the tiny models use (0 pad, 1 bos, 2 eos). `save_tiny_pruned_checkpoint` prunes such a
model by 20% on random calibration ids and saves it with the tokenizer, as `OlicaPruner` does for a real model;
`save_tiny_dense_checkpoint` saves the unpruned model and tokenizer, as a stand-in for a model to prune.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import make_tiny_model

TINY_VOCAB_SIZE = 384  # 256 byte symbols + 3 special tokens + 125 merges
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: make_tiny_model's pad/bos/eos ids


def make_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from optimum_olica.data import bundled_calibration_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([bundled_calibration_text()[:100_000]], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=256
    )


def save_tiny_pruned_checkpoint(directory: str | Path, family: str = "llama_gqa", ratio: float = 0.2) -> Path:
    """Prunes a tiny ``family`` model with a text tokenizer and saves the checkpoint to ``directory``."""
    from optimum_olica import OlicaConfig, OlicaPruner

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(family, vocab_size=len(tokenizer))
    calibration = torch.randint(3, len(tokenizer), (16, 32), generator=torch.Generator().manual_seed(0))
    pruner = OlicaPruner(model, tokenizer)
    pruner.prune(OlicaConfig(ratio=ratio), calibration_dataset=calibration, save_directory=directory, progress=False)
    return Path(directory)


def save_tiny_dense_checkpoint(directory: str | Path, family: str = "llama_gqa") -> Path:
    """Saves an unpruned tiny ``family`` model with the tokenizer: a stand-in for a Hub model in example runs."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(family, vocab_size=len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
