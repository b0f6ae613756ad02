"""Sequential layer-by-layer calibration: moves data and layers, knows nothing of the pruning math.

For each decoder layer the pipeline (1) takes the dense layer from a ``LayerSource`` on the compute device, (2)
replays the captured layer inputs through it while the algorithm's hooks accumulate statistics (the calibration
pass), (3) asks the algorithm for the pruned layer (the compress step), then (4) runs the pruned layer as its two
residual sub-blocks, attention then MLP. Each sub-block is ``h + projection(features(h))``: the pipeline computes the
features (the input of the sub-block's output projection) batch by batch while the algorithm observes them, lets the
algorithm fit on them (it may refit the projection of the layer it built), and only then computes the sub-block's
outputs from the kept features: the next sub-block's inputs, and after the MLP the next layer's. (5) The finished
layer and its report record go to a ``LayerSink``. When the algorithm asks (``wants_dense_trajectory``), the dense
model's own activations travel beside the pruned model's: step (2) also runs the dense layer over them, under the
algorithm's ``observe_dense_trajectory``, to give the next layer's. Only one dense layer and the calibration
activations are resident on the compute device at a time; the algorithm never writes the pipeline's tensors and never
replaces its modules.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from .errors import NonFiniteActivationsError
from .sources import decoder_layers


class LayerAlgorithm(Protocol):
    """Everything the pipeline and the entry point call on a pruning algorithm (``optimum_olica.olica.
    OlicaLayerPruner``; the magnitude baseline of the benchmarks, ``bench/magnitude.py``).

    Per layer, in this order: ``observe_dense`` (a context manager around the dense layer's calibration pass),
    ``prune`` (returns the pruned layer, a new module the algorithm owns until ``finish_layer`` returns), then for each
    sub-block (the ``SubBlock`` ``ATTENTION``, then ``MLP``) that ``fits_block`` claims: ``observe_block`` (a context manager
    around the pass that computes the sub-block's features on the pruned layer's own inputs) and ``fit_block`` (given
    those features, read-only; it may refit the sub-block's output projection before the pipeline computes the
    outputs with it); last ``finish_layer`` (the layer's report record). After the last layer the entry point asks
    ``choose_calibrated_layers``; a resumable run saves and restores ``state_dict``.
    """

    # True: the dense model's own activations are carried beside the pruned model's, and ``observe_dense_trajectory``
    # wraps the dense layer's pass over them, right after ``observe_dense`` (never entered when False).
    wants_dense_trajectory: bool

    def observe_dense(self, layer: torch.nn.Module, layer_idx: int): ...  # context manager

    def observe_dense_trajectory(self, layer: torch.nn.Module, layer_idx: int): ...  # context manager

    def prune(self, layer: torch.nn.Module, layer_idx: int) -> torch.nn.Module: ...

    def fits_block(self, block: SubBlock, layer_idx: int) -> bool: ...

    def observe_block(self, block: SubBlock, pruned: torch.nn.Module, layer_idx: int): ...  # context manager

    def fit_block(self, block: SubBlock, pruned: torch.nn.Module, layer_idx: int, features: list) -> None: ...

    def finish_layer(self, pruned: torch.nn.Module, layer_idx: int) -> dict: ...

    def choose_calibrated_layers(self, count: int, exclude: tuple[int, ...] = ()) -> list: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LayerSink(Protocol):
    """Where finished layers go (``optimum_olica.sinks``; ``optimum_olica.resume.ResumableSink`` wraps one)."""

    def store(self, layer_idx: int, layer: torch.nn.Module, record: dict) -> None: ...


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
    # The dense model's own inputs of the current layer, carried beside the pruned model's when the algorithm asks
    # (``wants_dense_trajectory``); None otherwise. They start as the captured inputs, which both models share.
    dense_hidden_states: list[torch.Tensor] | None = None

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
    allocation: float = 0.0  # the dense pass that sets per-layer widths (layer_allocation="adaptive")
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
            "allocation_s": self.allocation,
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
    inputs: list[torch.Tensor] | None = None,
) -> list[torch.Tensor] | None:
    """Run ``layer`` (in the place of decoder layer ``layer_idx``) over every stored batch (``inputs``, default the
    pruned model's), with the keyword arguments that layer receives in the model; returns its outputs on the storage
    device (or None)."""
    outputs = []
    inputs = activations.hidden_states if inputs is None else inputs
    for states, kwargs in zip(inputs, activations.kwargs_of_layer(layer_idx)):
        output = layer(states.to(device), **_move(kwargs, device))
        if isinstance(output, tuple):
            output = output[0]
        _check_finite(output)
        if keep_outputs:
            outputs.append(output.to(activations.storage_device))
    return outputs if keep_outputs else None


@dataclass(frozen=True)
class SubBlock:
    """One residual half of a decoder layer: ``h + <body>.<projection>(features)``, the features being what the body
    computes from ``<norm>(h)`` up to its output projection.

    Every decoder layer the pipeline runs (the stock families' and ``OlicaDecoderLayer``, whose calibration branches
    are attached only after the layer loop) is the attention sub-block followed by the MLP sub-block.
    """

    name: str
    norm: str
    body: str
    projection: str
    takes_layer_kwargs: bool  # the attention needs the layer's mask and rotary embeddings; the MLP nothing
    features_wait_on_host: bool

    def output_projection(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The sub-block's last linear map in ``layer``, whose input is the sub-block's features."""
        return getattr(getattr(layer, self.body), self.projection)


ATTENTION = SubBlock("attention", "input_layernorm", "self_attn", "o_proj", True, False)
# The FFN activations (tokens x FFN width) are the widest tensor kept between passes: computed on an accelerator,
# they wait in host memory and are copied back once each (an exact copy).
MLP = SubBlock("mlp", "post_attention_layernorm", "mlp", "down_proj", False, True)
SUB_BLOCKS = (ATTENTION, MLP)


def block_features(layer: torch.nn.Module, block: SubBlock, hidden_states: torch.Tensor, kwargs: dict):
    """The input of ``block``'s output projection, computed by the layer's own modules; the forward stops there."""
    captured = []

    def stop(module, args):
        captured.append(args[0])
        raise _StopForward

    handle = block.output_projection(layer).register_forward_pre_hook(stop)
    try:
        body, normed = getattr(layer, block.body), getattr(layer, block.norm)(hidden_states)
        body(hidden_states=normed, **kwargs) if block.takes_layer_kwargs else body(normed)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def block_output(layer: torch.nn.Module, block: SubBlock, hidden_states: torch.Tensor, features: torch.Tensor):
    """The sub-block's output from its features: the residual plus the output projection (exactly the layer's own
    ``residual + body(...)``, which ends in that projection)."""
    return hidden_states + block.output_projection(layer)(features)



def run_dense(
    source,
    activations: CalibrationActivations,
    observe: Callable,
    device: torch.device,
    *,
    num_batches: int,
    progress: bool = True,
) -> None:
    """The dense model's forward over the first ``num_batches`` calibration batches, layer by layer, each layer run
    inside ``observe(layer, layer_idx)`` (a context manager that may hook it). ``activations`` are left as they are."""
    subset = CalibrationActivations(
        list(activations.hidden_states[:num_batches]), activations.layer_kwargs[:num_batches],
        activations.storage_device,
    )
    bar = tqdm(range(len(source)), desc="Olica allocation", unit="layer", disable=not progress)
    for layer_idx in bar:
        with source.dense_layer(layer_idx, device) as dense, observe(dense, layer_idx), _non_finite_named(layer_idx):
            subset.hidden_states = replay(dense, subset, device, layer_idx=layer_idx)


def run_sequential(
    source,
    sink: LayerSink,
    activations: CalibrationActivations,
    algorithm: LayerAlgorithm,
    device: torch.device,
    *,
    timings: PipelineTimings,
    progress: bool = True,
    first_layer: int = 0,
) -> list[dict]:
    """The layer loop from ``first_layer`` on (earlier layers were restored from a resume checkpoint); returns the
    algorithm's per-layer records. Each finished layer is stored once ``activations`` hold the next layer's inputs."""
    records = []
    bar = tqdm(
        range(first_layer, len(source)), desc="Olica pruning", unit="layer", disable=not progress,
        initial=first_layer, total=len(source),
    )
    for layer_idx in bar:
        started = time.perf_counter()
        passes = SubBlockPasses(activations, algorithm, device, layer_idx, timings)
        tick = time.perf_counter()
        with source.dense_layer(layer_idx, device) as dense:
            timings.load += time.perf_counter() - tick
            pruned = passes.calibrate_and_prune(dense)
            attention_features = passes.features(ATTENTION, pruned, activations.hidden_states)
            passes.fit(ATTENTION, pruned, attention_features)
            hidden = passes.outputs(ATTENTION, pruned, activations.hidden_states, attention_features)
            mlp_features = passes.features(MLP, pruned, hidden)
        # The MLP's fit (the largest solves) and its outputs do not need the dense layer: release it first.
        del dense
        passes.fit(MLP, pruned, mlp_features)
        hidden = passes.outputs(MLP, pruned, hidden, mlp_features)
        record = algorithm.finish_layer(pruned, layer_idx)
        activations.hidden_states = hidden
        tick = time.perf_counter()
        timings.per_layer.append(tick - started)  # before the store: a resumable sink saves the timings with the layer
        sink.store(layer_idx, pruned, record)
        timings.store += time.perf_counter() - tick
        timings.per_layer[-1] += time.perf_counter() - tick
        records.append(record)
    return records


@dataclass
class SubBlockPasses:
    """The passes of one layer: the dense calibration pass and, per sub-block of the pruned layer, the features pass,
    the algorithm's fit and the outputs pass (timed into ``timings``)."""

    activations: CalibrationActivations
    algorithm: LayerAlgorithm
    device: torch.device
    layer_idx: int
    timings: PipelineTimings

    def calibrate_and_prune(self, dense: torch.nn.Module) -> torch.nn.Module:
        tick = time.perf_counter()
        with self.algorithm.observe_dense(dense, self.layer_idx), _non_finite_named(self.layer_idx):
            replay(dense, self.activations, self.device, layer_idx=self.layer_idx, keep_outputs=False)
        if self.activations.dense_hidden_states is not None:  # the dense model's own stream, one layer further
            with self.algorithm.observe_dense_trajectory(dense, self.layer_idx), _non_finite_named(self.layer_idx):
                self.activations.dense_hidden_states = replay(
                    dense, self.activations, self.device, layer_idx=self.layer_idx,
                    inputs=self.activations.dense_hidden_states,
                )
        self.timings.statistics += time.perf_counter() - tick
        tick = time.perf_counter()
        pruned = self.algorithm.prune(dense, self.layer_idx)
        self.timings.decomposition += time.perf_counter() - tick
        return pruned

    def features(self, block: SubBlock, layer, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The sub-block's features for every batch, observed by the algorithm; None when it fits nothing on them
        (the outputs pass then computes each batch's features itself, and nothing is kept)."""
        if not self.algorithm.fits_block(block, self.layer_idx):
            return None
        tick = time.perf_counter()
        features = []
        with self.algorithm.observe_block(block, layer, self.layer_idx), _non_finite_named(self.layer_idx):
            for states, kwargs in zip(inputs, self.activations.kwargs_of_layer(self.layer_idx)):
                batch_features = block_features(layer, block, states.to(self.device), self._moved(block, kwargs))
                features.append(self._keep(block, batch_features))
        self.timings.propagation += time.perf_counter() - tick
        return features

    def fit(self, block: SubBlock, layer, features: list[torch.Tensor] | None) -> None:
        if features is None:
            return
        tick = time.perf_counter()
        with _non_finite_named(self.layer_idx):
            self.algorithm.fit_block(block, layer, self.layer_idx, features)
        self.timings.refit += time.perf_counter() - tick

    def outputs(self, block: SubBlock, layer, inputs: list[torch.Tensor], features) -> list[torch.Tensor]:
        """The sub-block's outputs, on the storage device; each batch's kept features are released once used."""
        tick = time.perf_counter()
        outputs = []
        with _non_finite_named(self.layer_idx):
            for index, (states, kwargs) in enumerate(zip(inputs, self.activations.kwargs_of_layer(self.layer_idx))):
                states = states.to(self.device)
                if features is None:
                    batch_features = block_features(layer, block, states, self._moved(block, kwargs))
                else:  # the kept features need no layer arguments: nothing is moved to the device for them
                    batch_features, features[index] = features[index].to(self.device), None
                output = block_output(layer, block, states, batch_features)
                _check_finite(output)
                outputs.append(output.to(self.activations.storage_device))
        self.timings.propagation += time.perf_counter() - tick
        return outputs

    def _moved(self, block: SubBlock, kwargs: dict) -> dict:
        """The layer's keyword arguments on the compute device, for a sub-block that takes them."""
        return _move(kwargs, self.device) if block.takes_layer_kwargs else {}

    def _keep(self, block: SubBlock, features: torch.Tensor) -> torch.Tensor:
        """Where a batch's features wait for the outputs pass: the storage device, or host memory (page-locked from
        CUDA, so both copies run at full bus speed) for the MLP's on an accelerator."""
        if not block.features_wait_on_host or features.device.type == "cpu":
            return features.detach().to(self.activations.storage_device)
        host = torch.empty(features.shape, dtype=features.dtype, device="cpu", pin_memory=features.device.type == "cuda")
        return host.copy_(features.detach())


def _check_finite(output: torch.Tensor) -> None:
    # A NaN/Inf anywhere reaches the float32 sum: one reduction instead of a boolean tensor the size of the output;
    # the elementwise test only runs to rule out a sum that overflowed on finite (huge bf16) values.
    if not torch.isfinite(output.sum(dtype=torch.float32)) and not torch.isfinite(output).all():
        raise FloatingPointError("non-finite activations")


@contextmanager
def _non_finite_named(layer_idx: int) -> Iterator[None]:
    """NaN/Inf met in a pass (in the outputs, or refused by the statistics) become an error naming the layer."""
    try:
        yield
    except (FloatingPointError, ValueError) as error:
        if "non-finite" not in str(error):
            raise
        raise NonFiniteActivationsError(
            f"Layer {layer_idx} produced NaN/Inf activations on the calibration data, so no pruned model was made. "
            "With float16 models this is an overflow: load the model in bfloat16 or float32 "
            "(dtype=torch.bfloat16); otherwise check that the model's weights are finite."
        ) from None



__all__ = [
    "ATTENTION",
    "MLP",
    "SUB_BLOCKS",
    "CalibrationActivations",
    "LayerAlgorithm",
    "LayerSink",
    "PipelineTimings",
    "SubBlock",
    "SubBlockPasses",
    "block_features",
    "block_output",
    "capture_layer_inputs",
    "replay",
    "run_dense",
    "run_sequential",
]
