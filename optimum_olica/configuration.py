"""`OlicaConfig`: the pruning recipe.

A plain dataclass in the style of peft's configs: every field carries a
``help`` string in its metadata, user input is validated in ``__post_init__``
with ``OlicaConfigError``, a ``ValueError`` (the message names the field, the bad value and what is
allowed), and the config round-trips through sorted JSON
(``olica_config.json``) with a format version so that a file written by a
newer release is refused with a clear message instead of being misread.

This module imports only the standard library: reading a config never pulls
in torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar, Literal, get_args

from .errors import OlicaConfigError

__all__ = ["CONFIG_NAME", "OlicaConfig"]

CONFIG_NAME = "olica_config.json"

# The bundled calibration text, and the share of self-generated sequences mixed into it by self_calibration='auto':
# measured across domains in docs/recipes.md (at 20% removed: 1.34x / 1.79x / 2.21x dense perplexity on fiction,
# legal English and Python, against 1.23x / 1.94x / 3.21x for the bundled text alone).
BUNDLED_SOURCE = "austen"
AUTO_SELF_CALIBRATION = 0.5
# With data of the user's own, 'auto' adds this many self-generated sequences per data window, which only inform what
# is cut (refit_on='data'): on the screening protocol at 20% removed, 1.208x / 1.791x / 2.691x against 1.208x / 1.849x
# / 3.135x for the data alone (33%: 1.556x / 3.361x / 7.03x against 1.551x / 3.544x / 15.5x).
AUTO_ADDED_SELF_CALIBRATION = 0.5

StatisticsDtype = Literal["float64", "float32"]
Architecture = Literal["olica", "stock"]
LayerAllocation = Literal["adaptive", "uniform"]
ValueDecomposition = Literal["whitened", "fast", "exact"]
RefitOn = Literal["all", "data"]


def _is_int(value: Any) -> bool:
    # bool is a subclass of int; `skip_layers=[True]` is a mistake, not layer 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


logger = logging.getLogger(__name__)


# Settings of the run that earlier versions stored in the recipe, and where they are given now. Where a run happens is
# not what it computes: a run resumed on another device continues the same computation, and no weight depends on them.
RUN_SETTINGS = {
    "device": "prune_model(..., device=...) or OlicaPruner.prune(..., device=...)",
    "offload_activations": (
        "prune_model(..., offload_activations=True) or OlicaPruner.prune(..., offload_activations=True)"
    ),
    "streaming": "OlicaPruner.from_pretrained(path, streaming=True)",
}


@dataclass
class OlicaConfig:
    """The settings of one Olica pruning run.

    The target is `ratio`, the fraction of all model parameters to remove
    (embeddings and LM head included, tied weights counted once). By default
    the pruner splits it between attention (Q/K low rank, V/O neurons) and the
    FFN with the reference allocation of the paper; `qk_ratio`, `vo_ratio` and
    `ffn_ratio` pin a part explicitly. When all three are given the split is
    fully fixed and `ratio` is only informative: the achieved reduction is
    whatever those per-part ratios produce (the pruner reports it).

    Calibration data is described by `calibration_source` (the bundled Austen
    text, a local file or folder, or a Hub dataset name). In-memory sources
    (a list of strings, a `datasets.Dataset`, a tensor of token ids) are not
    stored in the config: pass them to the pruner directly.

    Where the run happens is not part of the recipe: the compute device and
    ``offload_activations`` are arguments of ``OlicaPruner.prune`` and
    ``prune_model``, streaming is ``OlicaPruner.from_pretrained(path, streaming=True)``.

    Example:
        ```python
        >>> config = OlicaConfig(ratio=0.25, num_samples=256)
        >>> config.save_pretrained("pruned")  # writes pruned/olica_config.json
        >>> OlicaConfig.from_pretrained("pruned") == config
        True
        ```
    """

    FORMAT_VERSION: ClassVar[int] = 1

    # -- Target -------------------------------------------------------------
    ratio: float = field(
        default=0.2,
        metadata={
            "help": (
                "Fraction of ALL model parameters to remove, embeddings and LM head included "
                "(tied weights counted once), in (0, 1). Split between attention and FFN by the "
                "reference allocation unless per-part ratios are given; only informative when "
                "qk_ratio, vo_ratio and ffn_ratio are all set. A ratio that pinned qk_ratio/vo_ratio cannot "
                "meet within 0.5 points is refused before pruning, with the range they allow."
            )
        },
    )
    qk_ratio: float | None = field(
        default=None,
        metadata={
            "help": (
                "Optional explicit ratio for the Q/K projections, in [0, 1): the parameter "
                "reduction of their activation-weighted low-rank factorisation. None: allocated "
                "from `ratio`."
            )
        },
    )
    vo_ratio: float | None = field(
        default=None,
        metadata={
            "help": (
                "Optional explicit ratio for V/O, in [0, 1): the fraction of value neurons "
                "(per KV group, after the orthogonal rotation) removed. None: allocated from `ratio`."
            )
        },
    )
    ffn_ratio: float | None = field(
        default=None,
        metadata={
            "help": (
                "Optional explicit ratio for the FFN, in [0, 1): the fraction of intermediate "
                "neurons removed. None: allocated from `ratio`."
            )
        },
    )

    architecture: Architecture = field(
        default="olica",
        metadata={
            "help": (
                "What the pruned model must be: 'olica' (default) prunes Q/K (low rank), V/O and the FFN and is "
                "saved as the Olica architecture, which loads in transformers (plugin or trust_remote_code); "
                "'stock' prunes only what the base family's own architecture holds (FFN neurons, the same width "
                "in every layer, plus the o_proj/down_proj refits) and is saved as that family (e.g. "
                "LlamaForCausalLM), which vLLM, TGI, SGLang and llama.cpp serve at its pruned size. 'stock' "
                "sets qk_ratio and vo_ratio to 0 and refuses calibration branches and skip_layers."
            )
        },
    )

    layer_allocation: LayerAllocation = field(
        default="adaptive",
        metadata={
            "help": (
                "How the FFN neurons kept are shared between layers: 'adaptive' (default) gives each layer the "
                "width its neuron scores earn on the dense model (one dense pass over a quarter of the calibration "
                "batches; the scores are compared across layers on a log scale standardized per layer), 'uniform' "
                "gives every layer the same width. Both keep the same number of neurons in all, so the same "
                "parameter count. architecture='stock' always uses 'uniform' (one width is what the base family "
                "holds); an 'adaptive' model exports to stock and to llama.cpp only with its FFN zero-padded."
            )
        },
    )

    # -- Calibration data ---------------------------------------------------
    calibration_source: str = field(
        default=BUNDLED_SOURCE,
        metadata={
            "help": (
                "Where calibration text comes from: 'austen' (the bundled public-domain Jane "
                "Austen text), a local .txt/.json/.jsonl/.parquet/.csv file or a folder of them, "
                "or a Hub dataset name ('wikitext2' and 'c4' are shortcuts). Lists of strings and "
                "datasets.Dataset objects are passed to the pruner directly, not stored here."
            )
        },
    )
    num_samples: int = field(
        default=128,
        metadata={"help": "Number of calibration sequences (token windows), >= 1."},
    )
    sequence_length: int = field(
        default=128,
        metadata={"help": "Length in tokens of each calibration sequence, >= 8."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed for drawing the calibration windows, >= 0. Same seed, same windows."},
    )
    self_calibration: float | str = field(
        default="auto",
        metadata={
            "help": (
                "Fraction of the num_samples calibration sequences the model writes itself, in [0, 1] "
                "(self-calibration, Williams et al. 2024): round(self_calibration * num_samples) sequences are sampled "
                "from the model (from its BOS token, temperature 1, seeded with `seed`) and alternate with windows of "
                "calibration_source, so the refit's cross-validation fits on one and validates on the other. "
                "'auto' (default): 0.5 with the bundled text ('austen', fiction, a poor stand-in for what a chat or "
                "code model serves); with data of your own (a source, a dataset or texts given to the pruner), all "
                "num_samples windows of it plus half as many written by the model, which only inform what is cut "
                "(recorded as num_samples 1.5 times larger, self_calibration 1/3, refit_on='data'); 0 in "
                "streaming mode, with weights offloaded to the CPU or disk, or without a BOS/EOS token to start "
                "from (the log says which). 0: the data only; 1: no data at all. "
                "Applies where the pruner draws the data (OlicaPruner.prune, optimum-cli olica prune); token ids "
                "passed in are used as they are. The generation time is reported as calibration_data.generation_s. "
                "See docs/recipes.md."
            )
        },
    )

    refit_on: RefitOn = field(
        default="all",
        metadata={
            "help": (
                "Which calibration sequences the o_proj/down_proj refits (and calibration branches) are fitted on when "
                "self-generated sequences are mixed in (self_calibration between 0 and 1): 'all' (default; data and "
                "generated) or 'data' (the data alone, cross-validated on two halves of it: the generated text "
                "then only informs what is cut). 'data' keeps nearly the in-domain figure of the data alone and "
                "part of the mix's gain elsewhere (docs/recipes.md). Nothing changes without a mix. "
                "self_calibration='auto' with data of your own sets it to 'data'."
            )
        },
    )

    # -- Linear calibration -------------------------------------------------
    calibration_rank_ratio: float = field(
        default=0.03,
        metadata={
            "help": (
                "Rank of the linear-calibration branch as a fraction of the hidden size, in [0, 1] "
                "(reference: 0.03, i.e. floor(0.03 * d))."
            )
        },
    )
    num_calibrated_layers: int = field(
        default=0,
        metadata={
            "help": (
                "Number of decoder layers that get the paper's low-rank linear-calibration branch, >= 0 "
                "(reference: 6 of 32). Default 0: the least-squares refit of o_proj/down_proj already does the "
                "linear calibration, inside the weights, and the branch measured no gain on top of it. "
                "Needs calibration_rank_ratio > 0."
            )
        },
    )
    ridge_strength: float = field(
        default=0.5,
        metadata={
            "help": (
                "Ridge damping of the linear-calibration fit, > 0: lambda = ridge_strength * "
                "mean(diag(X^T X)) * 16384 / n_tokens (reference: 0.5)."
            )
        },
    )

    refit_damping: float | str | None = field(
        default="auto",
        metadata={
            "help": (
                "Damping of the least-squares refit of o_proj and down_proj on the pruned layer's own inputs "
                "(our addition to the method, see docs/method.md): lambda = refit_damping * mean(diag(Z^T Z)), "
                "pulling towards the pruned weights. 'auto' (default) picks it per projection by two-fold "
                "cross-validation on the calibration tokens among 1e-3, 1e-2, 1e-1, 1, 10 (and declines the refit "
                "when it does not help); a number > 0 fixes it; None disables the refit (the paper's method)."
            )
        },
    )
    trajectory_weight: float = field(
        default=0.0,
        metadata={
            "help": (
                "Where the o_proj/down_proj refits aim, in [0, 1]: 0 is what the dense layer computes on the pruned "
                "model's inputs (each layer repairs its own error), 1 the dense model's own hidden states at that "
                "depth (each layer also repairs the error of the layers before it), in between a weighted mean. "
                "Default 0. 0.5 measured better in domain (1% at 20% removed, 4% at 33%) and worse on text far from "
                "the calibration data at 33% or with self-generated text mixed in: a setting for a domain model "
                "(docs/recipes.md). Above 0 the dense model's own activations are carried beside the pruned ones: "
                "one more dense pass per layer and one more copy of the calibration activations. Nothing changes "
                "without the refit or a calibration branch."
            )
        },
    )

    # -- Scope and numerics -------------------------------------------------
    skip_layers: list[int] = field(
        default_factory=list,
        metadata={
            "help": (
                "Indices of decoder layers left dense (integers >= 0, no duplicates; stored "
                "sorted). Their parameters stay, so the other layers are pruned harder to meet "
                "`ratio`."
            )
        },
    )
    dimension_multiple: int = field(
        default=8,
        metadata={
            "help": (
                "Q/K ranks, value head widths and FFN widths are rounded to multiples of this (>= 1; 1 keeps "
                "exact widths; a value head may also keep its full head_dim). Matmuls with widths that are not "
                "multiples of 8 run markedly slower on CPUs and GPUs, and group-wise quantized formats (GGUF "
                "q8_0/q4_k_m, 4-bit kernels) want multiples of 32 to 256. The FFN width is solved after the "
                "attention widths are rounded, and keeps its exact width when rounding would miss `ratio` by more "
                "than 0.5 points."
            )
        },
    )
    statistics_dtype: StatisticsDtype = field(
        default="float64",
        metadata={
            "help": (
                "Dtype of the running sums of the activation statistics (second moments, X^T X, X^T E): "
                "'float64' (default, robust to massive activations) or 'float32', which halves those sums "
                "(mostly host memory: the refit and calibration-branch sums live on the host) at a precision "
                "cost. It does not lower the accelerator's peak: each batch's products are float32 either "
                "way and every solve runs in float64."
            )
        },
    )

    qk_score_weighting: float = field(
        default=0.25,
        metadata={
            "help": (
                "How far each Q/K output's low-rank error is weighed by what it does to the attention scores, in "
                "[0, 1]: the scores read queries and keys only through q^T R k, so an error in a query channel "
                "costs as much as the keys carry in that rotary pair, and a key channel's as much as its group's "
                "queries. 0 weighs every output alike (the paper); 1 by the scores alone; in between, the squared "
                "weights blended with their mean. Default 0.25, measured better than 0 on all three texts at 20% "
                "removed and 7% better on Python at 33%, within 0.2% elsewhere (0.5 and 1 lose more in domain at "
                "33%; docs/benchmarks.md). Above 0 the statistics pass also sums the second moments of the query "
                "and key channels."
            )
        },
    )

    value_decomposition: ValueDecomposition = field(
        default="whitened",
        metadata={
            "help": (
                "How V/O are cut per KV group: 'whitened' (default; the value directions kept are those that carry "
                "the most of o_proj's output on the calibration tokens, weighing the second-moment matrix of "
                "o_proj's input, i.e. the values after the attention mixed them, shrunk toward its diagonal by "
                "value_covariance_shrinkage), 'fast' (the paper's fast orthogonal neuron decomposition: an "
                "orthogonal rotation from the SVD of the weighted o_proj columns, then the lowest-scored value "
                "neurons dropped) or 'exact' (the truncated SVD of the activation-weighted value-to-output product "
                "D_x V^T O^T D_out itself, which the fast one approximates). Compared in docs/benchmarks.md."
            )
        },
    )

    value_covariance_shrinkage: float = field(
        default=0.5,
        metadata={
            "help": (
                "With value_decomposition='whitened', how far the second-moment matrix of o_proj's input (each KV "
                "group's mean over its heads, head_dim x head_dim) is shrunk toward its diagonal, in [0, 1]: 1 "
                "weighs each value channel alone, 0 trusts the calibration text's correlations fully. Default 0.5, "
                "measured best of 0, 0.5 and 1 out of domain (docs/benchmarks.md). Ignored by 'fast' and 'exact'."
            )
        },
    )

    qk_covariance_shrinkage: float = field(
        default=0.5,
        metadata={
            "help": (
                "How Q/K are factored to low rank, in [0, 1]: each projection's output error is weighed by the "
                "attention input's second-moment matrix shrunk this far toward its diagonal. 1 is the paper's "
                "diagonal weighting (each input channel alone); 0 trusts the calibration text's channel "
                "correlations fully, which minimises the error on that text and generalises worse. Default 0.5, "
                "measured better than 1 in domain and on legal English at 20% and 33% removed, from 3% worse to 4% "
                "better on Python source (docs/benchmarks.md). Below 1 the statistics pass also sums the attention "
                "input's (hidden x hidden) X^T X."
            )
        },
    )

    format_version: int = field(
        default=1,
        metadata={
            "help": (
                "Version of the olica_config.json format. Written by save_pretrained; a file with "
                "a newer version than this release understands is refused."
            )
        },
    )

    # -- Not recipe settings (RUN_SETTINGS) -----------------------------------
    # Init-only parameters, not fields (never saved, compared or turned into CLI flags): they exist so that code written
    # for earlier versions, OlicaConfig(device="cuda"), is told where the setting went instead of "unexpected keyword".
    device: InitVar[None] = None
    offload_activations: InitVar[None] = None
    streaming: InitVar[None] = None

    # ----------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------
    def __post_init__(self, device: Any, offload_activations: Any, streaming: Any) -> None:
        self._refuse_run_settings(device=device, offload_activations=offload_activations, streaming=streaming)
        self._check_format_version(self.format_version)
        self._check_target()
        self._check_calibration_data()
        self._check_linear_calibration()
        self._check_trajectory_weight()
        self._check_layers_and_numerics()

    @staticmethod
    def _refuse_run_settings(**given: Any) -> None:
        for name, value in given.items():
            if value is not None:
                raise TypeError(
                    f"`{name}` is a setting of the run, not of the recipe (OlicaConfig): pass it to "
                    f"{RUN_SETTINGS[name]}."
                )

    def _check_target(self) -> None:
        self.ratio = self._real("ratio", self.ratio, "a number in (0, 1)")
        if not 0.0 < self.ratio < 1.0:
            raise OlicaConfigError(f"`ratio` must be in (0, 1) (exclusive), got {self.ratio!r}.")

        for name in ("qk_ratio", "vo_ratio", "ffn_ratio"):
            value = getattr(self, name)
            if value is None:
                continue
            value = self._real(name, value, "None or a number in [0, 1)")
            if not 0.0 <= value < 1.0:
                raise OlicaConfigError(f"`{name}` must be None or in [0, 1), got {value!r}.")
            setattr(self, name, value)

    def _check_calibration_data(self) -> None:
        if isinstance(self.calibration_source, os.PathLike):
            self.calibration_source = os.fspath(self.calibration_source)
        if not isinstance(self.calibration_source, str):
            raise OlicaConfigError(
                "`calibration_source` must be a string ('austen', a local path or a Hub dataset "
                f"name), got {type(self.calibration_source).__name__}. Lists of strings and "
                "datasets.Dataset objects are not stored in the config: pass them to the pruner directly."
            )
        if not self.calibration_source.strip():
            raise OlicaConfigError(
                "`calibration_source` must be a non-empty string, got ''. Use 'austen' for the bundled text."
            )

        self._check_int("num_samples", self.num_samples, minimum=1)
        self._check_int("sequence_length", self.sequence_length, minimum=8)
        self._check_int("seed", self.seed, minimum=0)
        allowed_refits = get_args(RefitOn)
        if self.refit_on not in allowed_refits:
            raise OlicaConfigError(f"`refit_on` must be one of {list(allowed_refits)}, got {self.refit_on!r}.")
        if self.self_calibration == "auto":
            return
        self.self_calibration = self._real("self_calibration", self.self_calibration, "'auto' or a number in [0, 1]")
        if not 0.0 <= self.self_calibration <= 1.0:
            raise OlicaConfigError(
                f"`self_calibration` must be in [0, 1] (the fraction of calibration sequences the model writes), "
                f"got {self.self_calibration!r}."
            )
        if self.refit_on == "data" and self.self_generated_samples() == self.num_samples:
            raise OlicaConfigError(
                f"refit_on='data' fits the refits on the data alone, but self_calibration={self.self_calibration} "
                "leaves no data: lower self_calibration, or use refit_on='all'."
            )

    def _check_linear_calibration(self) -> None:
        self.calibration_rank_ratio = self._fraction("calibration_rank_ratio", self.calibration_rank_ratio)
        self._check_int("num_calibrated_layers", self.num_calibrated_layers, minimum=0)
        if self.num_calibrated_layers > 0 and self.calibration_rank_ratio == 0.0:
            raise OlicaConfigError(
                f"`num_calibrated_layers={self.num_calibrated_layers}` needs `calibration_rank_ratio` > 0, "
                "got 0.0: a rank-0 calibration branch adds nothing. Set num_calibrated_layers=0 to "
                "disable linear calibration, or give calibration_rank_ratio a value in (0, 1]."
            )
        self.ridge_strength = self._real("ridge_strength", self.ridge_strength, "a finite number > 0")
        if not self.ridge_strength > 0.0:
            raise OlicaConfigError(f"`ridge_strength` must be > 0 (finite), got {self.ridge_strength!r}.")

        if self.refit_damping is not None and self.refit_damping != "auto":
            if isinstance(self.refit_damping, str):
                raise OlicaConfigError(
                    f"`refit_damping` must be 'auto', a number > 0 or None, got {self.refit_damping!r}."
                )
            self.refit_damping = self._real("refit_damping", self.refit_damping, "'auto', a finite number > 0, or None")
            if not self.refit_damping > 0.0:
                raise OlicaConfigError(
                    f"`refit_damping` must be > 0 (finite) or None to disable the refit, got {self.refit_damping!r}."
                )

    def _check_trajectory_weight(self) -> None:
        self.trajectory_weight = self._fraction("trajectory_weight", self.trajectory_weight)

    def _check_layers_and_numerics(self) -> None:
        self.skip_layers = self._check_skip_layers(self.skip_layers)
        self._check_architecture()
        self._check_int("dimension_multiple", self.dimension_multiple, minimum=1)

        allowed_dtypes = get_args(StatisticsDtype)
        if self.statistics_dtype not in allowed_dtypes:
            raise OlicaConfigError(
                f"`statistics_dtype` must be one of {list(allowed_dtypes)}, got {self.statistics_dtype!r}."
            )

        self.qk_covariance_shrinkage = self._fraction(
            "qk_covariance_shrinkage", self.qk_covariance_shrinkage,
            "1 weighs each input channel alone (the paper), 0 uses the full covariance."
        )

        self.qk_score_weighting = self._fraction(
            "qk_score_weighting", self.qk_score_weighting,
            "0 weighs every Q/K output alike (the paper), 1 by the attention scores alone."
        )
        self.value_covariance_shrinkage = self._fraction(
            "value_covariance_shrinkage", self.value_covariance_shrinkage,
            "1 weighs each value channel alone, 0 uses the full covariance."
        )

        allowed_decompositions = get_args(ValueDecomposition)
        if self.value_decomposition not in allowed_decompositions:
            raise OlicaConfigError(
                f"`value_decomposition` must be one of {list(allowed_decompositions)}, got {self.value_decomposition!r}."
            )

    def _check_architecture(self) -> None:
        """A 'stock' recipe keeps every layer expressible in the base family: nothing but a uniform FFN width."""
        allowed = get_args(Architecture)
        if self.architecture not in allowed:
            raise OlicaConfigError(f"`architecture` must be one of {list(allowed)}, got {self.architecture!r}.")
        allowed_allocations = get_args(LayerAllocation)
        if self.layer_allocation not in allowed_allocations:
            raise OlicaConfigError(
                f"`layer_allocation` must be one of {list(allowed_allocations)}, got {self.layer_allocation!r}."
            )
        if self.architecture != "stock":
            return
        self.layer_allocation = "uniform"  # the base family holds one FFN width
        pinned = [f"{name}={getattr(self, name)}" for name in ("qk_ratio", "vo_ratio") if getattr(self, name)]
        conflicts = pinned + [
            f"{name}={getattr(self, name)}" for name in ("num_calibrated_layers", "skip_layers") if getattr(self, name)
        ]
        if conflicts:
            raise OlicaConfigError(
                f"architecture='stock' prunes only FFN neurons, the same width in every layer, so that the base "
                f"family's own architecture holds the result; {', '.join(conflicts)} would need the Olica "
                "architecture (factored Q/K, narrow value heads, per-layer widths or a calibration branch). Leave "
                "them unset with architecture='stock', or use architecture='olica' and export with "
                "`optimum-cli olica export --format stock` (exact, larger)."
            )
        self.qk_ratio = self.vo_ratio = 0.0

    @staticmethod
    def _real(name: str, value: Any, allowed: str) -> float:
        """Checks that `value` is a finite real number (not a bool) and returns it as a float."""
        # An int too large for a float (10**400) is not finite here either, rather than an OverflowError.
        if not _is_real(value) or (isinstance(value, int) and abs(value) > 2**1023) or not math.isfinite(value):
            raise OlicaConfigError(f"`{name}` must be {allowed}, got {value!r}.")
        return float(value)

    @classmethod
    def _fraction(cls, name: str, value: Any, meaning: str = "") -> float:
        """Checks that `value` is a real number in [0, 1] and returns it as a float; ``meaning`` ends the error."""
        value = cls._real(name, value, "a number in [0, 1]")
        if not 0.0 <= value <= 1.0:
            raise OlicaConfigError(f"`{name}` must be in [0, 1], got {value!r}" + (f": {meaning}" if meaning else "."))
        return value

    @staticmethod
    def _check_int(name: str, value: Any, minimum: int) -> None:
        if not _is_int(value):
            raise OlicaConfigError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
        if value < minimum:
            raise OlicaConfigError(f"`{name}` must be >= {minimum}, got {value!r}.")

    @staticmethod
    def _check_skip_layers(value: Any) -> list[int]:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise OlicaConfigError(f"`skip_layers` must be a list of layer indices (integers >= 0), got {value!r}.")
        layers = list(value)
        bad = [index for index in layers if not _is_int(index) or index < 0]
        if bad:
            raise OlicaConfigError(f"`skip_layers` must contain integers >= 0, got invalid entries {bad!r}.")
        duplicates = sorted({index for index in layers if layers.count(index) > 1})
        if duplicates:
            raise OlicaConfigError(f"`skip_layers` must not contain duplicates, got {duplicates!r} more than once.")
        return sorted(layers)

    @classmethod
    def _check_format_version(cls, version: Any) -> None:
        if not _is_int(version) or version < 1:
            raise OlicaConfigError(f"`format_version` must be an integer in [1, {cls.FORMAT_VERSION}], got {version!r}.")
        if version > cls.FORMAT_VERSION:
            raise OlicaConfigError(
                f"This Olica config has format_version={version}, but this optimum-olica understands "
                f"format_version <= {cls.FORMAT_VERSION}: it was written by a newer optimum-olica. "
                "Upgrade with `pip install -U optimum-olica`."
            )

    # ----------------------------------------------------------------------
    # Serialisation
    # ----------------------------------------------------------------------
    def calibration_rank_for(self, hidden_size: int) -> int:
        """Rank of each linear-calibration branch on a model of ``hidden_size`` (0: the recipe attaches none)."""
        if self.num_calibrated_layers <= 0:
            return 0
        return max(1, math.floor(self.calibration_rank_ratio * hidden_size))

    def resolve_self_calibration(self, own_data: bool = False) -> OlicaConfig:
        """This recipe with `self_calibration='auto'` replaced by what it draws (itself otherwise).

        With the bundled text, `AUTO_SELF_CALIBRATION` of the `num_samples` sequences are the model's own. With data
        of the user's (``own_data``: data given to the pruner, or a `calibration_source` of theirs), the data keeps
        its `num_samples` windows and the model writes `AUTO_ADDED_SELF_CALIBRATION` times as many sequences more,
        which only inform what is cut: `num_samples` grows to the total and `refit_on` becomes 'data'.
        """
        if self.self_calibration != "auto":
            return self
        if not own_data and self.calibration_source == BUNDLED_SOURCE:
            return dataclasses.replace(self, self_calibration=AUTO_SELF_CALIBRATION)
        added = int(self.num_samples * AUTO_ADDED_SELF_CALIBRATION)
        if added == 0:
            return dataclasses.replace(self, self_calibration=0.0)
        total = self.num_samples + added
        return dataclasses.replace(self, num_samples=total, self_calibration=added / total, refit_on="data")

    def refit_sequence_mask(self):
        """Which calibration sequences the refits fit on (a bool tensor laid out as `mix_calibration_ids` mixes them),
        or None for all of them. Imports torch."""
        generated = self.self_generated_samples()
        if self.refit_on == "all" or generated in (0, self.num_samples):
            return None
        from .self_calibration import data_sequence_mask

        return data_sequence_mask(self.num_samples - generated, generated)

    def self_generated_samples(self) -> int:
        """How many of the `num_samples` calibration sequences the model writes itself ('auto' as it resolves with
        the bundled text; `resolve_self_calibration` first for data of the user's)."""
        resolved = self.resolve_self_calibration()
        # round-half-even is fine: the count only has to be the same for the same recipe.
        return round(resolved.self_calibration * resolved.num_samples)

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a JSON-safe dict (plain str/int/float/bool/None/list values)."""
        config_dict = {}
        for config_field in dataclasses.fields(self):
            value = getattr(self, config_field.name)
            config_dict[config_field.name] = list(value) if isinstance(value, list) else value
        return config_dict

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "OlicaConfig":
        """Builds a config from a dict, as written by `to_dict`.

        Args:
            config_dict: Field names to values. Keys this release does not know
                (e.g. from a newer release) are dropped with a warning; the run settings
                that earlier versions saved (``device``, ``offload_activations``,
                ``streaming``) are dropped silently (logged at INFO).

        Raises:
            ValueError: if the dict was written by a newer format version, or a
                value has the wrong type or is out of range (the message names
                the field).
        """
        if not isinstance(config_dict, dict):
            raise OlicaConfigError(f"An Olica config must be a dict of field values, got {type(config_dict).__name__}.")
        # Check the version first: a newer file's unknown keys are explained by its version.
        cls._check_format_version(config_dict.get("format_version", 1))
        run_settings = sorted(key for key in config_dict if key in RUN_SETTINGS)
        if run_settings:
            logger.info(
                "Dropping %s from the Olica config: settings of the run, which earlier versions saved with the "
                "recipe; they did not change the weights.", ", ".join(run_settings)
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(key for key in config_dict if key not in known and key not in RUN_SETTINGS)
        if unknown:
            warnings.warn(
                f"Ignoring unknown OlicaConfig keys {unknown}: they may come from a different "
                "optimum-olica version.",
                UserWarning,
                stacklevel=2,
            )
        return cls(**{key: value for key, value in config_dict.items() if key in known})

    def to_json_string(self) -> str:
        """Returns the config as JSON with sorted keys and an indent of 2."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Writes `to_json_string()` to `json_file_path`."""
        with open(json_file_path, "w", encoding="utf-8") as file:
            file.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, json_file_path: str | os.PathLike) -> "OlicaConfig":
        """Reads a config written by `to_json_file`."""
        with open(json_file_path, encoding="utf-8") as file:
            try:
                config_dict = json.load(file)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
                raise OlicaConfigError(
                    f"{os.fspath(json_file_path)!r} is not valid JSON in UTF-8 ({error}); write it again with "
                    "OlicaConfig.save_pretrained, or delete it."
                ) from error
        return cls.from_dict(config_dict)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Writes the config to `save_directory/olica_config.json`, creating the folder.

        Returns:
            The path of the written file.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise OlicaConfigError(f"save_directory {save_directory!r} is a file; give a directory.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        self.to_json_file(path)
        return path

    @classmethod
    def from_pretrained(cls, path_or_dir: str | os.PathLike) -> "OlicaConfig":
        """Loads a config from a directory holding `olica_config.json`, or from the file itself.

        Raises:
            FileNotFoundError: if neither exists.
        """
        path = os.fspath(path_or_dir)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"No {CONFIG_NAME} in directory {os.fspath(path_or_dir)!r}: was it saved with "
                    "OlicaConfig.save_pretrained (or by the Olica pruner)?"
                )
        elif not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path!r} is neither a directory containing {CONFIG_NAME} nor a config file."
            )
        return cls.from_json_file(path)
