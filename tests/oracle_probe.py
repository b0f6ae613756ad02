"""The generation oracle: every step of ``generate`` against a full recompute of the same prefix, row by row.

Imports nothing from optimum_olica, so it runs unchanged in a process where the package cannot be imported (the
``trust_remote_code`` path). As a script: ``python oracle_probe.py CHECKPOINT INPUTS.safetensors RESULT.json
[--trust-remote-code] [--block-package] [--attn eager|sdpa]``; it writes the worst discrepancy of each generation
setting as JSON.
"""

import json
import sys

import torch

GENERATION_SETTINGS = {
    "dynamic_batch1": (None, False),
    "dynamic_left_padded": (None, True),
    "static_batch1": ("static", False),
    "static_left_padded": ("static", True),
}


def oracle_inputs(vocab_size: int = 128, seed: int = 1) -> dict[str, torch.Tensor]:
    """Three prompts of 9 tokens, two of them left-padded (3 and 5 pads), as a generation batch is."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    attention_mask[2, :5] = 0
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def generation_discrepancy(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, cache_implementation=None, max_new_tokens=8
) -> float:
    """Largest |logit difference| between ``generate``'s cached steps and a full recompute of each prefix.

    The reference runs each row alone, without its padding and without a cache: nothing it computes comes from the
    KV cache, the padding mask or the positions ``generate`` derives, so it shares none of their bugs.
    """
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # an EOS must not end the comparison early
        do_sample=False,
        pad_token_id=0,
        cache_implementation=cache_implementation,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert len(output.logits) == max_new_tokens
    prompt_length, worst = input_ids.shape[1], 0.0
    for row in range(input_ids.shape[0]):
        start = int((attention_mask[row] == 0).sum())  # left padding
        for step, step_logits in enumerate(output.logits):
            prefix = output.sequences[row : row + 1, start : prompt_length + step]
            reference = model(input_ids=prefix, use_cache=False).logits[0, -1]
            worst = max(worst, float((step_logits[row] - reference).abs().max()))
    return worst


def all_generation_discrepancies(model, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """The worst discrepancy of each setting: DynamicCache and StaticCache, batch 1 and a left-padded batch."""
    results = {}
    for name, (cache_implementation, padded) in GENERATION_SETTINGS.items():
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if not padded:
            input_ids, attention_mask = input_ids[:1], attention_mask[:1]
        results[name] = generation_discrepancy(
            model, input_ids, attention_mask, cache_implementation=cache_implementation
        )
    return results


def main(argv: list[str]) -> None:
    if "--block-package" in argv:
        sys.modules["optimum_olica"] = None  # makes `import optimum_olica` raise ImportError
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    checkpoint, inputs_path, result_path = argv[:3]
    attn = argv[argv.index("--attn") + 1] if "--attn" in argv else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, trust_remote_code="--trust-remote-code" in argv, attn_implementation=attn, dtype=torch.float32
    ).eval()
    result = all_generation_discrepancies(model, load_file(inputs_path))
    result["model_module"] = type(model).__module__
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1:])
