"""Hashes of the weights the pruner writes for fixed recipes on tiny random models: a refactoring that must not change
what is computed compares these before and after (``git stash``-free: run it in two checkouts).

    python bench/checkpoint_hashes.py                 # prints JSON: recipe -> sha256 of each safetensors file
    python bench/checkpoint_hashes.py --out hashes.json

Each recipe prunes a freshly built tiny model (seeded weights, randomised biases and norms) on seeded calibration ids,
in one thread, so the same code gives the same bytes on the same machine and torch build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_tiny_model  # noqa: E402

import optimum_olica  # noqa: E402,F401
from optimum_olica import OlicaConfig  # noqa: E402
from optimum_olica.pruner import prune_model  # noqa: E402

from magnitude import magnitude_algorithm  # noqa: E402  (bench/, beside this file)

# name -> (family, OlicaConfig fields, prune_model keyword arguments)
RECIPES = {
    "llama_gqa-default": ("llama_gqa", {"ratio": 0.2}, {}),
    "llama_bias-default": ("llama_bias", {"ratio": 0.2}, {}),
    "qwen3-default": ("qwen3", {"ratio": 0.2}, {}),
    "llama_gqa-branch": ("llama_gqa", {"ratio": 0.25, "num_calibrated_layers": 1}, {}),
    "llama_gqa-skip": ("llama_gqa", {"ratio": 0.15, "skip_layers": [1]}, {}),
    "llama_gqa-forced-refit": ("llama_gqa", {"ratio": 0.2, "refit_damping": 0.1}, {}),
    "llama_gqa-no-refit": ("llama_gqa", {"ratio": 0.2, "refit_damping": None}, {}),
    "llama_gqa-exact-ond": ("llama_gqa", {"ratio": 0.2, "value_decomposition": "exact"}, {}),
    "llama_gqa-magnitude": ("llama_gqa", {"ratio": 0.2}, {"layer_algorithm": magnitude_algorithm}),
}


# Exact widths: at the default multiple of 8 the tiny models' 16-wide value heads stay whole, and the value pruning
# path would go unhashed.
EXACT_WIDTHS = {"dimension_multiple": 1}


def checkpoint_hash(family: str, fields: dict, kwargs: dict) -> str:
    model = make_tiny_model(family, vocab_size=384)
    calibration = torch.randint(3, 384, (8, 32), generator=torch.Generator().manual_seed(0))
    result = prune_model(model, OlicaConfig(**EXACT_WIDTHS, **fields), calibration, progress=False, device="cpu", **kwargs)
    digest = hashlib.sha256()
    for name, tensor in sorted(result.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def streamed_hash() -> str:
    """The streaming path: the tiny model saved to disk and pruned shard by shard; the hash of the written weights."""
    from safetensors.torch import load_file

    from optimum_olica.pruner import OlicaPruner

    with tempfile.TemporaryDirectory() as directory:
        make_tiny_model("llama_gqa", vocab_size=384).save_pretrained(Path(directory) / "dense")
        calibration = torch.randint(3, 384, (8, 32), generator=torch.Generator().manual_seed(0))
        pruner = OlicaPruner.from_pretrained(Path(directory) / "dense", streaming=True)
        pruner.prune(OlicaConfig(ratio=0.2, **EXACT_WIDTHS), calibration_dataset=calibration,
                     save_directory=Path(directory) / "pruned", progress=False, device="cpu")
        digest = hashlib.sha256()
        for path in sorted((Path(directory) / "pruned").glob("*.safetensors")):
            for name, tensor in sorted(load_file(path).items()):
                digest.update(name.encode())
                digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    hashes = {name: checkpoint_hash(*recipe) for name, recipe in RECIPES.items()}
    hashes["llama_gqa-streaming"] = streamed_hash()
    text = json.dumps(hashes, indent=2, sort_keys=True)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return hashes


if __name__ == "__main__":
    main()
