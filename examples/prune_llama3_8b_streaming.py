"""Prune a Llama-3-8B-class model on one GPU, streaming the weights layer by layer from the safetensors files.

`OlicaPruner.from_pretrained(model, streaming=True)` loads nothing: the model skeleton lives on the meta device, each
decoder layer's weights are read from disk only while that layer is calibrated and pruned, and each pruned layer is
written to its own shard at once. Device memory then holds one layer, the calibration activations and that layer's
working set instead of the whole 16 GB model: `--dry-run` prints the plan per phase (`optimum_olica.plan_memory`,
checked against the bytes really allocated on small shapes): about 2.3 GB on the GPU for Llama-3-8B with 256 x 128
tokens, 1.8 GB with `--offload-activations`, which keeps the activations in CPU memory between layers. (No real 8B
run on a GPU has been measured in this project, whose test machines have no GPU.)

A Hub id is downloaded first (about 16 GB for Llama-3-8B; gated models need `hf auth login`). Any local folder of
safetensors works too, on the CPU with `--device cpu` (slow for a real model; the test suite runs this script on a
tiny one). `--dry-run` checks the arguments, the output folder and the GPU, reads the model config when it is
available without network access, prints the memory plan, then stops.

Usage:
    python examples/prune_llama3_8b_streaming.py [--model meta-llama/Meta-Llama-3-8B] [--ratio 0.2]
        [--output-dir outputs/llama3-8b-olica-20] [--device cuda:0] [--offload-activations] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "meta-llama/Meta-Llama-3-8B"
# Its published config.json (the shape only), for the dry run's memory plan when the config is not in the local cache.
LLAMA3_8B_SHAPE = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, dtype="bfloat16", vocab_size=128256,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default {DEFAULT_MODEL})")
    recipe = parser.add_argument_group("pruning")
    recipe.add_argument("--ratio", type=float, default=0.2, help="fraction of ALL parameters to remove (default 0.2)")
    recipe.add_argument("--calibration", default="austen",
                        help="calibration source: 'austen' (bundled), 'wikitext2', 'c4', a local file or folder")
    recipe.add_argument("--num-samples", type=int, default=128, help="calibration sequences (default 128)")
    recipe.add_argument("--sequence-length", type=int, default=128, help="tokens per sequence (default 128)")
    compute = parser.add_argument_group("compute")
    compute.add_argument("--device", default="cuda:0", help="compute device for each layer (default cuda:0)")
    compute.add_argument("--offload-activations", action="store_true",
                         help="keep calibration activations in CPU memory between layers")
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", type=Path, default=None,
                        help="where to write the pruned checkpoint (default outputs/<model name>-olica-<percent>)")
    output.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    output.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="save progress after each layer here, so a killed run continues where it stopped")
    parser.add_argument("--dry-run", action="store_true", help="check everything that needs no download, then stop")
    args = parser.parse_args(argv)

    if not 0.0 < args.ratio < 1.0:
        parser.error(f"--ratio must be in (0, 1), got {args.ratio}.")
    for name in ("num_samples", "sequence_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.output_dir is None:
        args.output_dir = Path("outputs") / f"{Path(args.model).name}-olica-{round(100 * args.ratio)}"
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output-dir {args.output_dir} is a file; give a directory.")
    if args.output_dir.is_dir() and any(args.output_dir.iterdir()) and not args.overwrite:
        parser.error(f"--output-dir {args.output_dir} is not empty; pass --overwrite or choose another path.")
    return args


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used on this machine (None when it can)."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"--device {device}: CUDA is not available on this machine (run on a GPU, or pass --device cpu)."
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            return f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)."
    return None


def local_config(model: str):
    """The model's config from a local folder or the Hugging Face cache, or None (never downloads)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError):
        return None


def memory_plan(config, args: argparse.Namespace):
    """`optimum_olica.plan_memory` for this run: bytes on the device and the host per phase, from the config alone."""
    from optimum_olica import OlicaConfig
    from optimum_olica.memory_plan import plan_memory

    recipe = OlicaConfig(ratio=args.ratio, num_samples=args.num_samples, sequence_length=args.sequence_length)
    return plan_memory(config, recipe, device="cuda" if args.device.startswith("cuda") else "cpu", streaming=True,
                       offload_activations=args.offload_activations)


def dry_run(args: argparse.Namespace) -> None:
    print(f"model: {args.model} ({'local folder' if Path(args.model).is_dir() else 'Hub id, downloaded first'})")
    print(f"streaming: weights read layer by layer from the safetensors files, pruned layers written to "
          f"{args.output_dir.resolve()} as they finish")
    print(f"recipe: remove {args.ratio:.0%} of all parameters; calibration {args.calibration}, "
          f"{args.num_samples} x {args.sequence_length} tokens")
    problem = device_problem(args.device)
    print(f"compute device: {args.device}" + (f" -- NOTE: {problem}" if problem else " (available)"))
    if args.offload_activations:
        print("activations: offloaded to CPU memory between layers")
    config = local_config(args.model)
    if config is None and args.model == DEFAULT_MODEL:
        from transformers import LlamaConfig

        config = LlamaConfig(**LLAMA3_8B_SHAPE)
        print("model config: not in the local cache; the memory plan uses the published Llama-3-8B shape")
    if config is None:
        print("model config: not available offline (fetched with the weights on a real run)")
    else:
        print(memory_plan(config, args))
    print("dry run: arguments and paths are fine; nothing was downloaded or pruned.")


def run(args: argparse.Namespace) -> None:
    from optimum_olica import OlicaConfig, OlicaPruner

    problem = device_problem(args.device)
    if problem:
        sys.exit(f"error: {problem}")
    started = time.perf_counter()
    pruner = OlicaPruner.from_pretrained(args.model, streaming=True, checkpoint_dir=args.checkpoint_dir)
    config = OlicaConfig(
        ratio=args.ratio,
        calibration_source=args.calibration,
        num_samples=args.num_samples,
        sequence_length=args.sequence_length,
    )
    # Streaming writes the checkpoint layer by layer and returns nothing: the pruned model is read back from disk.
    pruner.prune(config, save_directory=args.output_dir, overwrite=args.overwrite, device=args.device,
                 offload_activations=args.offload_activations)
    report = json.loads((args.output_dir / "olica_report.json").read_text(encoding="utf-8"))
    print(f"Parameters: {report['parameters_before']:,} -> {report['parameters_after']:,} "
          f"(removed {report['achieved_ratio']:.2%})")
    print(f"Saved to {args.output_dir.resolve()} in {time.perf_counter() - started:.0f} s; load it with "
          "`import optimum_olica` + AutoModelForCausalLM.from_pretrained, or trust_remote_code=True.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dry_run(args) if args.dry_run else run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
