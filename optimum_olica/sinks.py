"""Where pruned layers go, and how each destination becomes a finished model.

- ``ModelSink``: back into the model (on the device the dense layer came from, the CPU for accelerate-offloaded
  layers); ``finish`` builds the Olica model from the model's tensors.
- ``ShardSink`` (streaming): each layer to its own safetensors shard at once, and out of memory; ``finish`` completes
  the checkpoint directory: the non-layer tensors read from the source files, the shard index, the config and the
  modeling code.

Both finish from the same inputs: the final config (the plan's dimensions with the ranks of the calibration branches
chosen after the loop) and those branches' tensors, ``{layer index: {name within the layer: tensor}}``, cast to the
layer's dtype by the sink.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from .conversion import build_olica_model, causal_lm_class_for
from .sources import SafetensorsWeights, decoder_layers, device_of, has_accelerate_hook, has_offloaded_weights

BranchTensors = dict[int, dict[str, torch.Tensor]]


class ModelSink:
    """Puts each pruned layer back into the model, on the device the dense layer came from (CPU if offloaded)."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.layers = decoder_layers(model)

    def store(self, layer_idx: int, layer: torch.nn.Module, record: dict | None = None) -> None:
        dense = self.layers[layer_idx]
        home = torch.device("cpu") if has_offloaded_weights(dense) else device_of(dense)
        if has_accelerate_hook(dense):
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(dense, recurse=True)
        self.layers[layer_idx] = layer.to(home)

    def finish(self, final_config, branches: BranchTensors) -> PreTrainedModel:
        """The pruned Olica model: the model's tensors (pruned layers included) and the calibration branches."""
        state = _full_state_dict(self.model)
        prefix = f"{self.model.base_model_prefix}.layers."
        for layer_idx, tensors in branches.items():
            reference = state[f"{prefix}{layer_idx}.mlp.down_proj.weight"]
            state.update({
                f"{prefix}{layer_idx}.{name}": tensor.to(device=reference.device, dtype=reference.dtype).contiguous()
                for name, tensor in tensors.items()
            })
        final_config._attn_implementation = self.model.config._attn_implementation
        pruned = build_olica_model(final_config, state)
        pruned.generation_config = self.model.generation_config
        return pruned


class ShardSink:
    """Streaming: each pruned layer is written to its own safetensors shard and released from memory."""

    def __init__(self, directory: str | Path, weights: SafetensorsWeights, model: PreTrainedModel):
        self.directory = Path(directory)
        self.weights = weights  # the dense checkpoint: the non-layer tensors are copied from it
        self.model = model  # the meta skeleton: its prefix and tied-weight setting
        self.prefix = f"{model.base_model_prefix}.layers."
        self.files: dict[int, str] = {}
        self.weight_map: dict[str, str] = {}

    def store(self, layer_idx: int, layer: torch.nn.Module, record: dict | None = None) -> None:
        self._write(layer_idx, layer.state_dict())

    def finish(self, final_config, branches: BranchTensors) -> None:
        """Add the calibration branches to their layers' shards, then write the rest of the checkpoint."""
        for layer_idx, tensors in branches.items():
            state = self._read(layer_idx)
            dtype = state["mlp.down_proj.weight"].dtype
            self._write(layer_idx, {**state, **{name: tensor.to(dtype) for name, tensor in tensors.items()}})
        self._write_non_layer_tensors(final_config)
        total_size = sum((self.directory / file).stat().st_size for file in set(self.weight_map.values()))
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        with init_empty_weights():
            skeleton = causal_lm_class_for(final_config)(final_config)
        skeleton.save_config_and_code(self.directory)
        generation_config = self.weights.directory / "generation_config.json"
        if generation_config.exists():
            (self.directory / "generation_config.json").write_text(generation_config.read_text())

    def _write_non_layer_tensors(self, final_config) -> None:
        """Embeddings, final norm and (untied) LM head, copied from the dense checkpoint into one shard."""
        rest = [name for name in self.weights.file_of if not name.startswith(self.prefix)]
        if final_config.tie_word_embeddings:
            rest = [name for name in rest if name != "lm_head.weight"]
        tensors = self.weights.load(rest, torch.device("cpu"))
        save_file({k: v.contiguous() for k, v in tensors.items()}, self.directory / "model-rest.safetensors",
                  metadata={"format": "pt"})
        self.weight_map.update({name: "model-rest.safetensors" for name in tensors})

    def _write(self, layer_idx: int, state: dict[str, torch.Tensor]) -> None:
        name = f"model-layer-{layer_idx:05d}.safetensors"
        tensors = {f"{self.prefix}{layer_idx}.{key}": value.detach().cpu().contiguous() for key, value in state.items()}
        save_file(tensors, self.directory / name, metadata={"format": "pt"})
        self.files[layer_idx] = name
        self.weight_map.update({key: name for key in tensors})

    def _read(self, layer_idx: int) -> dict[str, torch.Tensor]:
        prefix = f"{self.prefix}{layer_idx}."
        with safe_open(self.directory / self.files[layer_idx], framework="pt") as handle:
            return {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys()}


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if has_accelerate_hook(model):
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        return get_state_dict_offloaded_model(model)
    return model.state_dict()


__all__ = ["BranchTensors", "ModelSink", "ShardSink"]
