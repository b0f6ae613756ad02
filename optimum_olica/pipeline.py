"""Sequential layer-by-layer calibration: moves data and layers, knows nothing of the pruning math.

For each decoder layer the pipeline (1) materialises the dense layer on the compute device, (2) replays the
captured layer inputs through it while the algorithm's hooks accumulate statistics, (3) asks the algorithm for the
pruned layer, (4) lets the algorithm refine the pruned layer (it may replay the inputs through parts of it), (5) replays the
inputs through the pruned layer (the algorithm observes this pass too, and may amend its outputs) to produce the
next layer's inputs, (6) releases the dense layer and lets the algorithm finish the pruned one, and (7) hands the
pruned layer to a sink. Only one dense layer and the calibration activations are resident on the compute device at
a time.

Where the dense weights come from is a ``LayerSource``: the model's own modules (on any device, including
accelerate-offloaded ones) or, in streaming mode, the safetensors files read one layer at a time.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from accelerate import init_empty_weights
from accelerate.utils import align_module_device
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import CheckpointVerificationError, NonFiniteActivationsError
from .integrity import read_safetensors_header


class LayerAlgorithm(Protocol):
    """Everything the pipeline and the entry point call on a pruning algorithm (implemented by
    ``optimum_olica.olica.OlicaLayerPruner`` and the magnitude baseline).

    Per layer, in this order: ``observe_dense`` (a context manager around the dense layer's calibration pass),
    ``prune``, ``refine`` (may replay the calibration batches through the pruned layer), ``observe_pruned`` (a context
    manager around the propagation pass), ``finish_layer`` (returns the layer's report record). After the last layer
    the entry point asks ``choose_calibrated_layers``; resuming saves and restores ``state_dict``.
    """

    def observe_dense(self, layer: torch.nn.Module, layer_idx: int): ...  # context manager

    def prune(self, layer: torch.nn.Module, layer_idx: int) -> torch.nn.Module: ...

    def refine(self, dense: torch.nn.Module, pruned: torch.nn.Module, layer_idx: int, replay) -> None: ...

    def observe_pruned(self, dense: torch.nn.Module, pruned: torch.nn.Module, layer_idx: int): ...  # context

    def finish_layer(self, pruned: torch.nn.Module, layer_idx: int, outputs: list[torch.Tensor]) -> dict: ...

    def choose_calibrated_layers(self, count: int, exclude: tuple[int, ...] = ()) -> list: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _StopForward(Exception):
    pass


@dataclass
class CalibrationActivations:
    """The inputs of the current layer for every calibration batch, and the keyword arguments the model passed.

    ``layer_kwargs[batch][layer]`` holds what the model's forward passed to decoder layer ``layer`` for that batch:
    layers of different types (sliding-window and full attention) get different masks. The dicts of one batch share
    their tensors (one mask per layer type, one copy of the rotary embeddings), so memory does not grow with depth.
    """

    hidden_states: list[torch.Tensor]
    layer_kwargs: list[list[dict]]
    storage_device: torch.device

    def kwargs_of_layer(self, layer_idx: int) -> list[dict]:
        """The keyword arguments decoder layer ``layer_idx`` receives, one dict per calibration batch."""
        return [batch_kwargs[layer_idx] for batch_kwargs in self.layer_kwargs]

    @property
    def num_tokens(self) -> int:
        return sum(batch.shape[0] * batch.shape[1] for batch in self.hidden_states)


@dataclass
class PipelineTimings:
    """Seconds spent in each phase, summed over layers (the profile `olica_report.json` records)."""

    capture: float = 0.0
    load: float = 0.0
    statistics: float = 0.0
    decomposition: float = 0.0
    refit: float = 0.0
    propagation: float = 0.0
    store: float = 0.0
    per_layer: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "capture_s": self.capture,
            "load_s": self.load,
            "statistics_s": self.statistics,
            "decomposition_s": self.decomposition,
            "refit_s": self.refit,
            "propagation_s": self.propagation,
            "store_s": self.store,
            "per_layer_s": self.per_layer,
        }


def _move(value, device: torch.device, moved: dict[int, torch.Tensor] | None = None):
    """``value`` (tensors inside tuples, lists and dicts included) on ``device``.

    ``moved`` maps ``id(tensor)`` to its copy on ``device``: a tensor met again (the mask every full-attention layer
    receives) is moved once and shared.
    """
    if isinstance(value, torch.Tensor):
        if moved is None:
            return value.to(device)
        if id(value) not in moved:
            moved[id(value)] = value.to(device)
        return moved[id(value)]
    if isinstance(value, tuple):
        return tuple(_move(item, device, moved) for item in value)
    if isinstance(value, list):
        return [_move(item, device, moved) for item in value]
    if isinstance(value, dict):
        return {key: _move(item, device, moved) for key, item in value.items()}
    return value


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM of a supported family (``model.model.layers``)."""
    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `{model.base_model_prefix}.layers` decoder stack.")
    return layers


# The KV-cache argument a model hands its decoder layers: `past_key_values` up to transformers 5.23, `cache` from
# 5.24 (which warns on the old name). Replayed calls pass neither: without a cache each call sees only its own tokens.
_CACHE_ARGUMENTS = ("cache", "past_key_values")


@torch.no_grad()
def capture_layer_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    storage_device: torch.device,
    input_device: torch.device,
) -> CalibrationActivations:
    """Run the model's forward with its decoder layers stubbed out; keep what each layer receives.

    The model's own forward builds the embeddings, the causal masks (one per layer type: sliding-window and full
    attention differ), the position ids and the rotary embeddings, so replaying the captured tensors layer by layer
    reproduces the full forward exactly. While capturing, every decoder layer only records its arguments and passes
    its input through: no layer weight is read (streaming skeletons keep theirs on the meta device), and the forward
    stops after the last layer, before the final norm and the LM head.
    """
    layers = decoder_layers(model)
    hidden_states: list[torch.Tensor] = []
    layer_kwargs: list[list[dict]] = []
    moved: dict[int, torch.Tensor] = {}  # the current batch's tensors already on the storage device, by id

    def record(layer_idx: int, *args, **kwargs):
        states = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1:
            raise RuntimeError(
                f"{type(model).__name__} passes {len(args)} positional arguments to its decoder layers; the "
                "calibration pipeline replays only hidden_states positionally and the rest by keyword."
            )
        batch_kwargs = layer_kwargs[-1]
        if layer_idx != len(batch_kwargs):
            raise RuntimeError(
                f"{type(model).__name__}'s forward called decoder layer {layer_idx} after {len(batch_kwargs)} "
                "layers: the calibration pipeline needs the layers called once each, in order."
            )
        if layer_idx == 0:
            hidden_states.append(states.to(storage_device))
        kwargs = {key: value for key, value in kwargs.items() if key not in _CACHE_ARGUMENTS}
        kwargs["use_cache"] = False
        batch_kwargs.append(_move(kwargs, storage_device, moved))
        if layer_idx == len(layers) - 1:
            raise _StopForward
        return states

    with _forwards_replaced(layers, record):
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(input_device)
            layer_kwargs.append([])
            moved.clear()  # ids are unique only while the batch's tensors are alive
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            if len(layer_kwargs[-1]) != len(layers):
                raise RuntimeError(
                    f"{type(model).__name__}'s forward called {len(layer_kwargs[-1])} of its {len(layers)} decoder "
                    "layers: the calibration pipeline needs every layer called once, in order."
                )
    return CalibrationActivations(hidden_states, layer_kwargs, storage_device)


@contextmanager
def _forwards_replaced(layers: torch.nn.ModuleList, forward: Callable) -> Iterator[None]:
    """Within the block, calling ``layers[i]`` calls ``forward(i, *args, **kwargs)`` instead of the layer's forward.

    The instance attribute shadows the class's ``forward`` (an accelerate hook's wrapper, stored the same way, is
    put back afterwards), and the layer object stays in place, so a model that reads layer attributes in its loop
    (transformers 5.0 reads ``decoder_layer.attention_type``) still finds them.
    """
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for layer_idx, layer in enumerate(layers):
            layer.forward = functools.partial(forward, layer_idx)
        yield
    finally:
        for layer, original in zip(layers, saved):
            if original is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = original


@torch.no_grad()
def replay(
    layer: torch.nn.Module,
    activations: CalibrationActivations,
    device: torch.device,
    *,
    layer_idx: int,
    keep_outputs: bool = True,
) -> list[torch.Tensor] | None:
    """Run ``layer`` (in the place of decoder layer ``layer_idx``) over every stored batch, with the keyword
    arguments that layer receives in the model; returns its outputs on the storage device (or None)."""
    outputs = []
    for states, kwargs in zip(activations.hidden_states, activations.kwargs_of_layer(layer_idx)):
        output = layer(states.to(device), **_move(kwargs, device))
        if isinstance(output, tuple):
            output = output[0]
        # A NaN/Inf anywhere reaches the float32 sum: one reduction instead of a boolean tensor the size of the
        # output; the elementwise test only runs to rule out a sum that overflowed on finite (huge bf16) values.
        if not torch.isfinite(output.sum(dtype=torch.float32)) and not torch.isfinite(output).all():
            raise FloatingPointError("non-finite activations")
        if keep_outputs:
            outputs.append(output.to(activations.storage_device))
    return outputs if keep_outputs else None


class ModelLayerSource:
    """Dense layers taken from the model itself, wherever accelerate placed them (GPU, CPU or offloaded)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layers = decoder_layers(model)

    def __len__(self) -> int:
        return len(self.layers)

    @contextmanager
    def dense_layer(self, layer_idx: int, device: torch.device) -> Iterator[torch.nn.Module]:
        layer = self.layers[layer_idx]
        if _has_accelerate_hook(layer) or _device_of(layer) != device:
            # A hook-free copy on the compute device: offloaded weights are read once, not at every batch.
            # accelerate hooks the leaf modules, so each one is aligned (its offloaded weights loaded) in turn.
            with ExitStack() as stack:
                for module in layer.modules():
                    stack.enter_context(align_module_device(module, device))
                state = {name: tensor.to(device) for name, tensor in layer.state_dict().items()}
            yield _module_from_state(layer, state)
        else:
            yield layer


class ModelLayerSink:
    """Puts each pruned layer back into the model, on the device the dense layer came from (CPU if offloaded)."""

    def __init__(self, model: torch.nn.Module):
        self.layers = decoder_layers(model)

    def store(self, layer_idx: int, pruned: torch.nn.Module) -> None:
        dense = self.layers[layer_idx]
        home = torch.device("cpu") if _has_offloaded_weights(dense) else _device_of(dense)
        if _has_accelerate_hook(dense):
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(dense, recurse=True)
        self.layers[layer_idx] = pruned.to(home)


class SafetensorsWeights:
    """Read-only access to a checkpoint's tensors by name, across the shards of a safetensors checkpoint."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.file_of = {name: self.directory / file for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise CheckpointVerificationError(
                    f"{index} is not a valid shard index ({type(error).__name__}: {error}). Download or save the "
                    "checkpoint again."
                ) from None
        elif (self.directory / "model.safetensors").exists():
            single = self.directory / "model.safetensors"
            self.file_of = {name: single for name in read_safetensors_header(single)}
        else:
            raise FileNotFoundError(
                f"Streaming needs safetensors weights, but {self.directory} has neither model.safetensors nor "
                "model.safetensors.index.json. Convert the checkpoint with save_pretrained(safe_serialization=True)."
            )
        # Headers against file sizes, now: a truncated or corrupted shard fails before any layer is pruned, not
        # after an hour (the data itself is read layer by layer, and a damaged read there still names the file).
        for file in sorted(set(self.file_of.values())):
            if not file.is_file():
                raise CheckpointVerificationError(
                    f"{file} is named by the shard index but does not exist. Download or save the checkpoint again."
                )
            stored = read_safetensors_header(file)
            absent = [name for name, owner in self.file_of.items() if owner == file and name not in stored]
            if absent:
                raise CheckpointVerificationError(
                    f"{file} lacks tensors its shard index assigns to it ({absent[:3]}). Download or save the "
                    "checkpoint again."
                )

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [name for name in self.file_of if name.startswith(prefix)]

    def load(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The named tensors on ``device``; a truncated or corrupted file raises an error naming it."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(file, framework="pt", device=str(device)) as handle:
                    for name in file_names:
                        tensors[name] = handle.get_tensor(name)
            except Exception as error:  # safetensors raises its own error types for damaged files
                raise CheckpointVerificationError(
                    f"Could not read {name!r} from {file}: {error}. The file is truncated or corrupted; download or "
                    "save the checkpoint again."
                ) from error
        return tensors


class SafetensorsLayerSource:
    """Streaming: each dense layer is read from the safetensors files only while it is processed."""

    def __init__(self, model: torch.nn.Module, weights: SafetensorsWeights):
        self.layers = decoder_layers(model)
        self.weights = weights
        self.prefix = f"{model.base_model_prefix}.layers."

    def __len__(self) -> int:
        return len(self.layers)

    @contextmanager
    def dense_layer(self, layer_idx: int, device: torch.device) -> Iterator[torch.nn.Module]:
        prefix = f"{self.prefix}{layer_idx}."
        names = self.weights.names_with_prefix(prefix)
        state = {name[len(prefix):]: tensor for name, tensor in self.weights.load(names, device).items()}
        dtype = next(iter(state.values())).dtype
        layer = _module_from_state(self.layers[layer_idx], state)
        yield layer.to(dtype)
        del layer, state


class SafetensorsLayerSink:
    """Streaming: each pruned layer is written to its own safetensors shard and released from memory."""

    def __init__(self, directory: Path, prefix: str):
        self.directory = Path(directory)
        self.prefix = prefix
        self.files: dict[int, str] = {}
        self.weight_map: dict[str, str] = {}

    def file_name(self, layer_idx: int) -> str:
        return f"model-layer-{layer_idx:05d}.safetensors"

    def store(self, layer_idx: int, pruned: torch.nn.Module) -> None:
        self.write(layer_idx, pruned.state_dict())

    def write(self, layer_idx: int, state: dict[str, torch.Tensor]) -> None:
        name = self.file_name(layer_idx)
        tensors = {f"{self.prefix}{layer_idx}.{key}": value.detach().cpu().contiguous() for key, value in state.items()}
        save_file(tensors, self.directory / name, metadata={"format": "pt"})
        self.files[layer_idx] = name
        self.weight_map.update({key: name for key in tensors})

    def read(self, layer_idx: int) -> dict[str, torch.Tensor]:
        prefix = f"{self.prefix}{layer_idx}."
        with safe_open(self.directory / self.files[layer_idx], framework="pt") as handle:
            return {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys()}


def _has_accelerate_hook(module: torch.nn.Module) -> bool:
    return any(hasattr(submodule, "_hf_hook") for submodule in module.modules())


def _has_offloaded_weights(module: torch.nn.Module) -> bool:
    return any(param.device.type == "meta" for param in module.parameters())


def _device_of(module: torch.nn.Module) -> torch.device:
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _module_from_state(template: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh module of ``template``'s class and constructor arguments holding ``state``."""
    attention = getattr(template, "self_attn", None)
    config, layer_idx = attention.config, attention.layer_idx
    with init_empty_weights():
        module = type(template)(config, layer_idx)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def run_sequential(
    source,
    sink,
    activations: CalibrationActivations,
    algorithm: LayerAlgorithm,
    device: torch.device,
    *,
    timings: PipelineTimings,
    progress: bool = True,
    on_layer_done: Callable[[int, dict, torch.nn.Module], None] | None = None,
    first_layer: int = 0,
) -> list[dict]:
    """The layer loop from ``first_layer`` on (earlier layers were restored from a resume checkpoint).

    ``on_layer_done(layer_idx, record, pruned)`` runs once a layer is stored and ``activations`` hold the next
    layer's inputs: the point where a resume checkpoint is complete. Returns the algorithm's per-layer records.
    """
    records = []
    bar = tqdm(
        range(first_layer, len(source)), desc="Olica pruning", unit="layer", disable=not progress,
        initial=first_layer, total=len(source),
    )
    for layer_idx in bar:
        started = time.perf_counter()
        tick = started
        with source.dense_layer(layer_idx, device) as dense:
            timings.load += time.perf_counter() - tick

            tick = time.perf_counter()
            with algorithm.observe_dense(dense, layer_idx):
                _run_checked(dense, activations, device, layer_idx, keep_outputs=False)
            timings.statistics += time.perf_counter() - tick

            tick = time.perf_counter()
            pruned = algorithm.prune(dense, layer_idx)
            timings.decomposition += time.perf_counter() - tick

            tick = time.perf_counter()
            algorithm.refine(
                dense,
                pruned,
                layer_idx,
                lambda module: _run_checked(module, activations, device, layer_idx, keep_outputs=False),
            )
            timings.refit += time.perf_counter() - tick

            tick = time.perf_counter()
            with algorithm.observe_pruned(dense, pruned, layer_idx):
                outputs = _run_checked(pruned, activations, device, layer_idx, keep_outputs=True)
            timings.propagation += time.perf_counter() - tick

        # The algorithm's finishing work (its largest solves) does not need the dense layer: release it first.
        del dense
        tick = time.perf_counter()
        record = algorithm.finish_layer(pruned, layer_idx, outputs)
        timings.refit += time.perf_counter() - tick
        tick = time.perf_counter()
        sink.store(layer_idx, pruned)
        activations.hidden_states = outputs
        timings.store += time.perf_counter() - tick
        timings.per_layer.append(time.perf_counter() - started)
        records.append(record)
        if on_layer_done is not None:
            on_layer_done(layer_idx, record, pruned)
    return records


def _run_checked(layer, activations, device, layer_idx: int, keep_outputs: bool):
    try:
        return replay(layer, activations, device, layer_idx=layer_idx, keep_outputs=keep_outputs)
    except (FloatingPointError, ValueError) as error:
        if "non-finite" not in str(error):
            raise
        raise NonFiniteActivationsError(
            f"Layer {layer_idx} produced NaN/Inf activations on the calibration data, so no pruned model was made. "
            "With float16 models this is an overflow: load the model in bfloat16 or float32 "
            "(dtype=torch.bfloat16); otherwise check that the model's weights are finite."
        ) from None


__all__ = [
    "CalibrationActivations",
    "LayerAlgorithm",
    "ModelLayerSink",
    "ModelLayerSource",
    "SafetensorsLayerSink",
    "SafetensorsLayerSource",
    "SafetensorsWeights",
    "PipelineTimings",
    "capture_layer_inputs",
    "decoder_layers",
    "replay",
    "run_sequential",
]
