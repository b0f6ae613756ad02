"""Load a pruned checkpoint and generate text with plain transformers: no optimum-olica needed.

A pruned folder carries its own modeling files (`configuration_olica.py`, `modeling_olica.py`) and an `auto_map` in
`config.json`, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` builds the pruned
architecture from them with only torch and transformers installed. This script never imports optimum_olica, and
`--block-plugin` makes importing it impossible, to show that nothing comes from the package even where it is
installed. An FFN-only checkpoint saved as the stock family loads the same way (trust_remote_code is then unused).

Runs offline on a local folder. `--dry-run` reads `config.json` and says which classes and files would be loaded,
without loading the weights.

Usage:
    python examples/generate_without_plugin.py outputs/smollm2-olica-20 [--prompt "..."] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PROMPT = "What is the capital of France?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a pruned checkpoint folder")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    parser.add_argument("--block-plugin", action="store_true",
                        help="make `import optimum_olica` fail, as on a machine where it is not installed")
    parser.add_argument("--dry-run", action="store_true", help="say what would be loaded, then stop")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}.")
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"{args.checkpoint} has no config.json: give the folder a pruned model was saved to.")
    return args


def describe(checkpoint: Path) -> list[str]:
    """What config.json says will be loaded: the architecture and, for remote code, the classes and files."""
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    lines = [f"model_type {config.get('model_type')!r}, architectures {config.get('architectures')}"]
    auto_map = config.get("auto_map")
    if auto_map:
        for auto_class, reference in sorted(auto_map.items()):
            module = reference.split(".")[0]
            present = "present" if (checkpoint / f"{module}.py").is_file() else "MISSING"
            lines.append(f"{auto_class} -> {reference} ({module}.py {present})")
    else:
        lines.append("no auto_map: a stock transformers architecture, loaded without remote code")
    return lines


def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    import torch

    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.block_plugin:
        sys.modules["optimum_olica"] = None  # `import optimum_olica` now raises ImportError
    for line in describe(args.checkpoint):
        print(line)
    if args.dry_run:
        print("dry run: would load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) "
              f"and generate {args.max_new_tokens} tokens.")
        return 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, trust_remote_code=True).eval()
    # trust_remote_code here too: without it, transformers stops to ask about the config's auto_map.
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=True)
    plugin = sys.modules.get("optimum_olica")
    print(f"loaded {type(model).__name__} from module {type(model).__module__} "
          f"({model.num_parameters():,} parameters); optimum_olica imported: {plugin is not None}")
    print(f"Prompt: {args.prompt}")
    print(f"Reply: {generate(model, tokenizer, args.prompt, args.max_new_tokens)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
