"""Screening of what is cut where at the same target (issue 15): how layers share the FFN, which neurons a layer keeps,
and how parameters are split between attention and FFN.

The protocol of bench/calibration_screen.py (SmolLM2-135M-Instruct, the benchmark calibration: 128 windows of 128
tokens of the bundled Austen text, seed 0; perplexity on the first 8,192 tokens of Pride and Prejudice, licenses and
python-stdlib, windows of 128), at 20% and 33% of the parameters really removed.

- Sharing the FFN between layers (same number of neurons in all, so the same parameter count): ``uniform`` (one
  width in every layer); ``log_standardized`` (the shipped ``layer_allocation="adaptive"``: log scores standardized
  within the layer); ``standardized`` (raw scores standardized within the layer, FLAP's normalisation);
  ``mean_normalized`` (raw scores divided by the layer's mean); ``raw`` (raw scores as they are). The alternatives
  replace ``olica_math.comparable_neuron_scores`` for the run.
- Which neurons a layer keeps at the shipped widths: ``reconstruction*`` (bench/reconstruction.py, as
  ``prune_model``'s ``layer_algorithm``); ``shrunk_moments_*`` (``olica_math.ffn_neuron_scores`` fed second moments
  shrunk towards their mean).
- The attention/FFN split: ``qk_*`` (Q/K cut a multiple of the reference split's ratio), ``whole_values*``
  (``vo_ratio=0``); the FFN width is solved for the same total.
- Where the refits aim: ``trajectory*`` (bench/trajectory.py: targets moved toward the dense model's own hidden
  states; ``trajectory_setting`` is the library's ``trajectory_weight``), ``dense_stream`` (statistics and targets
  from the dense model's own activations, one dense pass per layer), ``reconstruction_trajectory``.
- What is cut seen on more than the data: ``plus_generated_64_refit_on_data`` (the 128 windows and 64 sequences the
  model writes, interleaved; the refits on the windows alone).
- How Q/K are factored and shared: ``shared_qk_*`` (bench/attention_allocation.py: ranks moved between layers at the
  same totals), ``covariance_qk*`` (bench/whitened_qk.py: the low rank under the input's full second-moment matrix,
  shrunk toward its diagonal; ``covariance_setting*`` is the library's ``qk_covariance_shrinkage``),
  ``reconstruction_shrunk_0.5`` (the same shrinkage for the FFN's reconstruction selection) and ``score_weighted*``
  (the library's ``qk_score_weighting``: each Q/K output channel weighed by what its error does to the attention
  scores).
- How V/O are reduced: ``whitened_values*`` (the library's ``value_decomposition="whitened"`` at shrinkages 0.5, 0
  and 1).

Rows measured before ``qk_covariance_shrinkage``, ``value_decomposition="whitened"`` and ``qk_score_weighting``
existed ran with the diagonal weighting, the fast OND and every Q/K output alike, which ``_recipe`` pins unless a
variant sets them.

Everything else is the shipped pipeline. Rows are written to bench/results/allocation_screen.json as they are
measured, with the per-layer widths; a run keeps the rows already there and measures the missing ones.

    python bench/allocation_screen.py --variants uniform,log_standardized --ratios 0.2,0.33
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chosen_variants, command_line, git_commit, results_path, write_results  # noqa: E402

from calibration_screen import perplexities, screening_texts  # noqa: E402
from optimum_olica import olica_math as om  # noqa: E402
from optimum_olica.allocation import reference_split  # noqa: E402
from optimum_olica.configuration import OlicaConfig  # noqa: E402
from optimum_olica.data import get_calibration_dataset  # noqa: E402
from optimum_olica.default_model import default_model_path  # noqa: E402
from optimum_olica.pruner import prune_model  # noqa: E402
from optimum_olica.self_calibration import generate_calibration_ids, mix_calibration_ids  # noqa: E402
from attention_allocation import AttentionAllocation  # noqa: E402
from reconstruction import reconstruction_algorithm  # noqa: E402
from trajectory import TrajectoryAlgorithm  # noqa: E402
from whitened_qk import covariance_algorithm  # noqa: E402

RESULTS = "allocation_screen"


def _standardized(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.detach().double()
    return (scores - scores.mean()) / scores.std()


def _mean_normalized(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.detach().double()
    return scores / scores.mean()


def _raw(scores: torch.Tensor) -> torch.Tensor:
    return scores.detach().double()


def _shrunk_scores(share: float):
    """ffn_neuron_scores with both second moments shrunk towards their mean by ``share`` (a domain-agnostic prior:
    a channel the calibration text leaves quiet may be busy on another text)."""
    original = om.ffn_neuron_scores

    def scores(gate, up, down, input_moment, intermediate_moment):
        shrink = lambda moment: (1 - share) * moment + share * moment.mean()  # noqa: E731
        return original(gate, up, down, shrink(input_moment), shrink(intermediate_moment))

    return scores


@dataclass(frozen=True)
class Variant:
    description: str
    overrides: dict = field(default_factory=dict)  # recipe fields
    qk_factor: float | None = None  # qk_ratio as this multiple of the reference split's (at most 0.95)
    comparable: Callable | None = None  # replaces olica_math.comparable_neuron_scores
    scores: Callable | None = None  # replaces olica_math.ffn_neuron_scores
    layer_algorithm: Callable | None = None  # prune_model's layer_algorithm
    generated: int = 0  # self-generated sequences mixed after the 128 benchmark windows (mix_calibration_ids)
    attention: AttentionAllocation | None = None  # per-layer attention widths (bench/attention_allocation.py)


_WHITENED = {"value_decomposition": "whitened", "value_covariance_shrinkage": 0.5}

VARIANTS = {
    "uniform": Variant("one FFN width in every layer (layer_allocation='uniform')", {"layer_allocation": "uniform"}),
    "log_standardized": Variant("the shipped adaptive allocation: log scores standardized per layer"),
    "standardized": Variant("raw scores standardized per layer (FLAP's normalisation)", comparable=_standardized),
    "mean_normalized": Variant("raw scores divided by the layer's mean score", comparable=_mean_normalized),
    "raw": Variant("raw scores compared across layers as they are", comparable=_raw),
    "reconstruction": Variant(
        "log_standardized widths; within each layer, the neurons kept by reconstruction instead of by score "
        "(bench/reconstruction.py: greedy optimal brain surgeon on down_proj's inputs, damping 0.01)",
        layer_algorithm=reconstruction_algorithm(1e-2)),
    "reconstruction_damping_0.1": Variant("reconstruction with damping 0.1",
                                          layer_algorithm=reconstruction_algorithm(0.1)),
    "reconstruction_damping_1": Variant("reconstruction with damping 1", layer_algorithm=reconstruction_algorithm(1.0)),
    "shrunk_moments_0.5": Variant("log_standardized, the FFN scores' second moments shrunk halfway to their mean "
                                  "(a prior for channels the calibration text leaves quiet)",
                                  scores=_shrunk_scores(0.5)),
    "shrunk_moments_0.2": Variant("log_standardized, the FFN scores' second moments shrunk a fifth of the way",
                                  scores=_shrunk_scores(0.2)),
    "qk_half": Variant("log_standardized, Q/K ranks cut half as much as the reference split (the FFN takes the rest)",
                       qk_factor=0.5),
    "qk_1.5": Variant("log_standardized, Q/K ranks cut 1.5 times as much as the reference split (the FFN keeps more)",
                      qk_factor=1.5),
    "whole_values": Variant("log_standardized, value heads kept whole (vo_ratio=0)", {"vo_ratio": 0.0}),
    "whole_values_qk_1.5": Variant("log_standardized, value heads kept whole and Q/K cut 1.5 times the reference "
                                   "split", {"vo_ratio": 0.0}, qk_factor=1.5),
    "trajectory": Variant("log_standardized; the o_proj/down_proj refits target the dense model's own hidden states at "
                          "that depth instead of the dense layer on the pruned inputs (bench/trajectory.py)",
                          layer_algorithm=TrajectoryAlgorithm(1.0)),
    "trajectory_half": Variant("trajectory with the targets halfway between the two",
                               layer_algorithm=TrajectoryAlgorithm(0.5)),
    "dense_stream": Variant("log_standardized; one dense pass per layer, over the dense model's own inputs: the "
                            "statistics that choose what is cut are the dense model's and the refits aim wholly at "
                            "its hidden states (trajectory with the shipped cost)",
                            layer_algorithm=TrajectoryAlgorithm(dense_statistics=True)),
    "reconstruction_trajectory": Variant("reconstruction with trajectory_weight=0.5: the two in-domain gains together",
                                         {"trajectory_weight": 0.5}, layer_algorithm=reconstruction_algorithm(1e-2)),
    "plus_generated_64_refit_on_data": Variant(
        "log_standardized; the 128 benchmark windows and 64 sequences the model writes itself (temperature 1, from "
        "BOS, seed 0), interleaved, the refits fitted on the 128 windows alone (refit_on='data'): the generated text "
        "only informs what is cut, and no data is given up for it (192 sequences: half as much pruning work again)",
        {"num_samples": 192, "self_calibration": 1 / 3, "refit_on": "data"}, generated=64),
    "trajectory_setting": Variant("trajectory_half through the recipe setting trajectory_weight=0.5 (the library's "
                                  "own dense stream instead of bench/trajectory.py: the same figures expected)",
                                  {"trajectory_weight": 0.5}),
    "trajectory_mlp": Variant("trajectory for the down_proj refit only (o_proj keeps the shipped target)",
                              layer_algorithm=TrajectoryAlgorithm(1.0, attention=False)),
    "shared_qk_energy": Variant("log_standardized; Q/K ranks shared between layers at the same totals, by each "
                                "activation-weighted singular value's share of its layer's energy "
                                "(bench/attention_allocation.py)", attention=AttentionAllocation("energy", False)),
    "shared_qk_log": Variant("log_standardized; Q/K ranks shared between layers at the same totals, the singular "
                             "values log-standardized per layer like the FFN scores",
                             attention=AttentionAllocation("log", False)),
    "covariance_qk": Variant("log_standardized; Q/K low rank fitted to the attention input's full covariance "
                             "instead of its diagonal (bench/whitened_qk.py)",
                             layer_algorithm=covariance_algorithm(0.0)),
    "covariance_qk_half": Variant("covariance_qk with the covariance shrunk halfway toward its diagonal",
                                  layer_algorithm=covariance_algorithm(0.5)),
    "covariance_qk_0.75": Variant("covariance_qk with the covariance shrunk three quarters of the way toward its "
                                  "diagonal", layer_algorithm=covariance_algorithm(0.75)),
    "covariance_qk_0.25": Variant("covariance_qk with the covariance shrunk a quarter of the way toward its diagonal",
                                  layer_algorithm=covariance_algorithm(0.25)),
    "covariance_setting": Variant("covariance_qk_half through the recipe setting qk_covariance_shrinkage=0.5 (the "
                                  "library's own statistics instead of bench/whitened_qk.py: the same figures "
                                  "expected)", {"qk_covariance_shrinkage": 0.5}),
    "covariance_setting_qk_1.25": Variant("covariance_setting with Q/K cut 1.25 times as much as the reference "
                                          "split (the FFN keeps more)", {"qk_covariance_shrinkage": 0.5},
                                          qk_factor=1.25),
    "covariance_setting_qk_0.75": Variant("covariance_setting with Q/K cut 0.75 times as much as the reference split "
                                          "(the FFN takes the rest)", {"qk_covariance_shrinkage": 0.5},
                                          qk_factor=0.75),
    "reconstruction_shrunk_0.5": Variant("reconstruction with the down_proj input's Gram shrunk halfway toward its "
                                         "diagonal (the prior that worked for Q/K: covariance_qk_half)",
                                         layer_algorithm=reconstruction_algorithm(1e-2, 0.5)),
    "whitened_values": Variant("covariance_setting; V/O reduced under the second moments of o_proj's input (each KV "
                               "group's mean over its heads, shrunk halfway toward its diagonal) instead of the fast "
                               "OND's rotation and scores (value_decomposition='whitened', the default since; first "
                               "measured with a screening copy of it)", {"qk_covariance_shrinkage": 0.5, **_WHITENED}),
    "whitened_values_full": Variant("whitened_values with the second moments as measured (no shrinkage)",
                                    {**_WHITENED, "qk_covariance_shrinkage": 0.5, "value_covariance_shrinkage": 0.0}),
    "whitened_values_diagonal": Variant("whitened_values with the diagonal of the second moments alone",
                                        {**_WHITENED, "qk_covariance_shrinkage": 0.5,
                                         "value_covariance_shrinkage": 1.0}),
    "score_weighted_qk": Variant("covariance_setting; each Q output channel's error weighed by the rotary-pair "
                                 "energy of its keys, each K channel's by its queries' (what the error does to the "
                                 "attention scores: qk_score_weighting=1; first measured with a screening copy of "
                                 "it)", {"qk_covariance_shrinkage": 0.5, "qk_score_weighting": 1.0}),
    "score_weighted_whitened_values": Variant("score_weighted_qk and whitened_values together",
                                              {"qk_covariance_shrinkage": 0.5, **_WHITENED,
                                               "qk_score_weighting": 1.0}),
    "score_weighted_half_whitened_values": Variant("score_weighted_whitened_values with the weights' squares shrunk "
                                                   "halfway toward their mean (qk_score_weighting=0.5)",
                                                   {"qk_covariance_shrinkage": 0.5, **_WHITENED,
                                                    "qk_score_weighting": 0.5}),
    "score_weighted_quarter_whitened_values": Variant("score_weighted_whitened_values with the weights' squares "
                                                      "shrunk three quarters of the way toward their mean "
                                                      "(qk_score_weighting=0.25)",
                                                      {"qk_covariance_shrinkage": 0.5, **_WHITENED,
                                                       "qk_score_weighting": 0.25}),
    "score_weighted_setting": Variant("score_weighted_quarter_whitened_values through the library's settings "
                                      "(value_decomposition='whitened', qk_score_weighting=0.25, the defaults since; "
                                      "the Q/K energies from hooks on the projections instead of the screening "
                                      "copy's products with the input's second moments: the same figures expected)",
                                      {"qk_covariance_shrinkage": 0.5, **_WHITENED, "qk_score_weighting": 0.25}),
}


def _recipe(variant: Variant, ratio: float) -> OlicaConfig:
    """The variant's recipe at ``ratio`` (adaptive allocation unless it says otherwise)."""
    # trajectory_weight 0, qk_covariance_shrinkage 1, the fast OND and no score weighting unless the variant says
    # otherwise: the rows measured before those defaults ran so.
    fields = {"layer_allocation": "adaptive", "trajectory_weight": 0.0, "qk_covariance_shrinkage": 1.0,
              "value_decomposition": "fast", "qk_score_weighting": 0.0, **variant.overrides}
    if variant.qk_factor is not None:
        fields["qk_ratio"] = min(0.95, variant.qk_factor * reference_split(ratio)[0])
    return OlicaConfig(ratio=ratio, **fields)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--ratios", default="0.2,0.33")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="tokens scored on each of the three texts")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = chosen_variants(parser, args.variants, VARIANTS)
    ratios = [float(ratio) for ratio in args.ratios.split(",")]

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    evaluation = screening_texts(tokenizer, args.eval_tokens)
    calibration = get_calibration_dataset(tokenizer, "austen", 128, 128, seed=0)

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    protocol = {"eval_tokens": args.eval_tokens, "calibration": "benchmark Austen 128 x 128, seed 0"}
    results_file = results_path(RESULTS, False)
    previous = json.loads(results_file.read_text()) if results_file.exists() else None
    rows = previous["rows"] if previous and previous.get("protocol") == protocol else []
    if not any(row["variant"] == "dense" for row in rows):
        rows.insert(0, {"variant": "dense", "perplexity": perplexities(load(), evaluation), "commit": git_commit()})
    for ratio in ratios:
        for name in variants:
            if any(row["variant"] == name and row["ratio"] == ratio for row in rows):
                print(f"{name} @ {ratio}: kept from the previous run", flush=True)
                continue
            variant = VARIANTS[name]
            config = _recipe(variant, ratio)
            model = load()
            variant_calibration = calibration
            if variant.generated:  # untimed, as the generation is reported apart from the pruning
                generated = generate_calibration_ids(model, tokenizer, variant.generated, 128, seed=0)
                variant_calibration = mix_calibration_ids(calibration, generated)
            prepare = getattr(variant.layer_algorithm, "prepare", None)
            if prepare is not None:  # what the variant reads from the dense model (untimed: screening only)
                prepare(model, variant_calibration)
            if variant.attention is not None:  # the same (the library would read it in its allocation pass)
                variant.attention.prepare(model, variant_calibration)
            started = time.perf_counter()
            with ExitStack() as patches:
                for function, replacement in (("comparable_neuron_scores", variant.comparable),
                                              ("ffn_neuron_scores", variant.scores)):
                    if replacement is not None:
                        patches.enter_context(mock.patch.object(om, function, replacement))
                if variant.attention is not None:
                    patches.enter_context(variant.attention.patched())
                result = prune_model(model, config, variant_calibration, progress=False,
                                     layer_algorithm=variant.layer_algorithm)
            row = {"variant": name, "ratio": ratio, "parameters": result.model.num_parameters(),
                   "widths": list(result.model.config.intermediate_sizes),
                   **({"attention_widths": {name: list(getattr(result.model.config, name)) for name in
                                            ("query_ranks", "key_ranks", "value_head_dims")}}
                      if variant.attention is not None else {}),
                   "perplexity": perplexities(result.model, evaluation), "prune_s": time.perf_counter() - started,
                   "allocation_s": result.report["timings"]["allocation_s"], "commit": git_commit(),
                   "command": command_line("allocation_screen.py", argv)}
            rows.append(row)
            _save(protocol, rows, argv)
            dense = rows[0]["perplexity"]
            print(f"{name} @ {ratio}: " + ", ".join(f"{k} {v / dense[k]:.3f}x" for k, v in row["perplexity"].items())
                  + f"; widths {min(row['widths'])}..{max(row['widths'])}", flush=True)
            del model, result
            if prepare is not None:
                variant.layer_algorithm.release()
            if variant.attention is not None:
                variant.attention.release()
    return _save(protocol, rows, argv)


def _save(protocol: dict, rows: list[dict], argv) -> dict:
    results = {"protocol": protocol,
               "variants": {name: variant.description for name, variant in VARIANTS.items()
                            if any(row["variant"] == name for row in rows)},
               "rows": rows}
    return write_results(results_path(RESULTS, False), results, "allocation_screen.py", argv, False)


if __name__ == "__main__":
    main()
