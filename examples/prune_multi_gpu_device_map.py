"""Prune a model spread over several GPUs (and CPU or disk) with an accelerate device map.

The model is loaded with ``device_map="auto"`` and a ``max_memory`` budget per device, so accelerate places whole
decoder layers on GPU 0, GPU 1, ..., then the CPU, then disk (``--offload-folder``). `OlicaPruner` takes the loaded
model as it is: each layer is moved to the compute device (``--device``) only while it is calibrated and pruned, then
goes back where the map put it, and the pruned checkpoint is saved as usual. Use this when the model fits in the
machines' memory taken together; when it does not fit even there, use streaming
(`examples/prune_llama3_8b_streaming.py`).

`--dry-run` checks the arguments, and when the model config is available without network access (a local folder or
the Hugging Face cache) builds the model skeleton on the meta device and prints the device map accelerate would use
for this budget, without loading a weight or needing a GPU.

Usage:
    python examples/prune_multi_gpu_device_map.py --model meta-llama/Meta-Llama-3-70B \\
        --max-memory 0=70GiB,1=70GiB,cpu=200GiB [--offload-folder offload] [--ratio 0.2] [--dry-run]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

DEFAULT_MODEL = "meta-llama/Meta-Llama-3-70B"


def parse_max_memory(text: str) -> dict:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}`` (accelerate's format)."""
    budget = {}
    for item in text.split(","):
        device, sep, amount = item.strip().partition("=")
        if not sep or not amount.strip():
            raise ValueError(f"{item.strip()!r} is not DEVICE=AMOUNT (e.g. 0=70GiB or cpu=200GiB).")
        device = device.strip()
        if device.isdigit():
            key = int(device)
        elif device in ("cpu", "disk"):
            key = device
        else:
            raise ValueError(f"Unknown device {device!r}: use a GPU index (0, 1, ...), 'cpu' or 'disk'.")
        budget[key] = amount.strip()
    return budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"Hub id or local folder (default {DEFAULT_MODEL})")
    placement = parser.add_argument_group("placement")
    placement.add_argument("--max-memory", default=None,
                           help="memory budget per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB (default: what is free)")
    placement.add_argument("--offload-folder", type=Path, default=None,
                           help="where layers that fit nowhere else are offloaded to disk")
    placement.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"],
                           help="weights dtype when loading (default bfloat16)")
    placement.add_argument("--device", default=None,
                           help="compute device for each layer, e.g. cuda:0 (default: CUDA when available, else cpu)")
    recipe = parser.add_argument_group("pruning")
    recipe.add_argument("--ratio", type=float, default=0.2, help="fraction of ALL parameters to remove (default 0.2)")
    recipe.add_argument("--num-samples", type=int, default=128, help="calibration sequences (default 128)")
    recipe.add_argument("--sequence-length", type=int, default=128, help="tokens per sequence (default 128)")
    recipe.add_argument("--offload-activations", action="store_true",
                        help="keep calibration activations in CPU memory between layers")
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", type=Path, default=None,
                        help="where to save the pruned checkpoint (default outputs/<model name>-olica-<percent>)")
    output.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--dry-run", action="store_true", help="print the device map for this budget, then stop")
    args = parser.parse_args(argv)

    if not 0.0 < args.ratio < 1.0:
        parser.error(f"--ratio must be in (0, 1), got {args.ratio}.")
    try:
        args.max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    except ValueError as error:
        parser.error(f"--max-memory: {error}")
    if args.output_dir is None:
        args.output_dir = Path("outputs") / f"{Path(args.model).name}-olica-{round(100 * args.ratio)}"
    if args.output_dir.is_dir() and any(args.output_dir.iterdir()) and not args.overwrite:
        parser.error(f"--output-dir {args.output_dir} is not empty; pass --overwrite or choose another path.")
    return args


def gpu_note(max_memory: dict | None) -> str:
    import torch

    available = torch.cuda.device_count()
    wanted = sorted(key for key in (max_memory or {}) if isinstance(key, int))
    missing = [index for index in wanted if index >= available]
    text = f"{available} GPU(s) here"
    if missing:
        text += f"; GPU(s) {missing} in --max-memory do not exist on this machine (fine for a dry run)"
    return text


def planned_device_map(model_name: str, max_memory: dict | None, dtype: str) -> dict | None:
    """The map accelerate would build for this budget, from the config alone (None when the config is not local)."""
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_name, local_files_only=True)
    except (OSError, ValueError):
        return None
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # tied embeddings count once, as in the real load
    weight_dtype = getattr(config, "dtype", None) if dtype == "auto" else getattr(torch, dtype)
    # accelerate warns about each GPU in the budget that this machine lacks; gpu_note has already said so.
    accelerate_logger = logging.getLogger("accelerate.utils.modeling")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)
    try:
        return infer_auto_device_map(
            skeleton, max_memory=max_memory, no_split_module_classes=skeleton._no_split_modules, dtype=weight_dtype
        )
    finally:
        accelerate_logger.setLevel(level)


def describe_device_map(device_map: dict) -> list[str]:
    """One line per device: how many decoder layers (and other modules) it holds."""
    layers, others = Counter(), Counter()
    for module, device in device_map.items():
        (layers if ".layers." in f".{module}." else others)[str(device)] += 1
    devices = list(dict.fromkeys(str(device) for device in device_map.values()))
    return [f"{device}: {layers[device]} decoder layer(s), {others[device]} other module(s)" for device in devices]


def dry_run(args: argparse.Namespace) -> None:
    print(f"model: {args.model}, loaded with device_map='auto', dtype {args.dtype}")
    budget = args.max_memory or "accelerate default (free memory of each device)"
    print(f"max_memory: {budget}; {gpu_note(args.max_memory)}")
    if args.offload_folder:
        print(f"disk offload folder: {args.offload_folder.resolve()}")
    print(f"recipe: remove {args.ratio:.0%} of all parameters, calibration {args.num_samples} x "
          f"{args.sequence_length} tokens, compute device {args.device or 'auto'}")
    print(f"output: {args.output_dir.resolve()}")
    device_map = planned_device_map(args.model, args.max_memory, args.dtype)
    if device_map is None:
        print("device map: the config is not available offline; accelerate builds the map when the model loads")
    else:
        for line in describe_device_map(device_map):
            print(f"device map: {line}")
        if "disk" in {str(device) for device in device_map.values()} and args.offload_folder is None:
            print("NOTE: some layers go to disk: pass --offload-folder for the real run")
    print("dry run: arguments are fine; no weights were loaded.")


def run(args: argparse.Namespace) -> None:
    from optimum_olica import OlicaConfig, OlicaPruner

    started = time.perf_counter()
    load_kwargs = {"device_map": "auto", "dtype": args.dtype}
    if args.max_memory:
        load_kwargs["max_memory"] = args.max_memory
    if args.offload_folder:
        load_kwargs["offload_folder"] = str(args.offload_folder)
    pruner = OlicaPruner.from_pretrained(args.model, **load_kwargs)
    placement = getattr(pruner.model, "hf_device_map", None)
    if placement:
        for line in describe_device_map(placement):
            print(f"device map: {line}")
    config = OlicaConfig(
        ratio=args.ratio,
        num_samples=args.num_samples,
        sequence_length=args.sequence_length,
    )
    pruned = pruner.prune(config, save_directory=args.output_dir, overwrite=args.overwrite, device=args.device,
                          offload_activations=args.offload_activations)
    report = pruner.report
    print(f"Parameters: {report['parameters_before']:,} -> {pruned.num_parameters():,} "
          f"(removed {report['achieved_ratio']:.2%})")
    print(f"Saved to {args.output_dir.resolve()} in {time.perf_counter() - started:.0f} s.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dry_run(args) if args.dry_run else run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
