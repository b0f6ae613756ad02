"""Computes a model's reference outputs; run as a script in a fresh process to test loading paths.

As a script: ``python reload_probe.py CHECKPOINT INPUTS.safetensors OUTPUTS.safetensors [--trust-remote-code]
[--block-package]``. With ``--block-package`` the optimum_olica package cannot be imported, as on a machine where
it is not installed. Only safetensors cross the process boundary (no pickle).
"""

import sys

import torch


def probe_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits on a plain batch, logits and greedy continuations on a left-padded batch."""
    with torch.no_grad():
        plain = model(input_ids=input_ids).logits
        padded = model(input_ids=input_ids, attention_mask=attention_mask).logits
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
    return {"plain_logits": plain, "padded_logits": padded * attention_mask[..., None], "generated": generated}


def main(argv: list[str]) -> None:
    if "--block-package" in argv:
        sys.modules["optimum_olica"] = None  # makes `import optimum_olica` raise ImportError
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    checkpoint, inputs_path, outputs_path = argv[:3]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code="--trust-remote-code" in argv).eval()
    inputs = load_file(inputs_path)
    outputs = probe_outputs(model, inputs["input_ids"], inputs["attention_mask"])
    outputs["model_class_is_stock"] = torch.tensor(int(type(model).__module__.startswith("transformers.models.")))
    save_file({key: value.contiguous() for key, value in outputs.items()}, outputs_path)
    print(type(model).__module__, type(model).__name__)


if __name__ == "__main__":
    main(sys.argv[1:])
