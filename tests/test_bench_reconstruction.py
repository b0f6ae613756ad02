"""bench/reconstruction.py, the FFN selection screened for issue 15 and not kept: the greedy selection against
brute-force least squares, the layer algorithm's first layer against a plain transformers forward."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_tiny_model
from optimum_olica import OlicaConfig, prune_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reconstruction  # noqa: E402

om = SimpleNamespace(neurons_kept_by_reconstruction=reconstruction.neurons_kept_by_reconstruction)

F64 = torch.float64


def problem(n: int, out: int, tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=generator, dtype=F64)
    inputs = torch.randn(tokens, n, generator=generator, dtype=F64) @ mixing  # correlated channels
    weight = torch.randn(out, n, generator=generator, dtype=F64)
    return weight, inputs


def refit_error(weight, inputs, keep, damping=1e-2):
    """Brute force: the damped least-squares error of the best weight on the kept inputs alone, by a direct solve
    of the normal equations (``||Z W^T - Z_K W_K^T||^2 + lam ||W^T - [W_K^T; 0]||^2``, lam as the function's)."""
    gram = inputs.T @ inputs
    lam = damping * float(gram.diagonal().mean())
    hessian = gram + lam * torch.eye(gram.shape[0], dtype=F64)
    keep = list(keep)
    kept_weight = torch.linalg.solve(hessian[keep][:, keep], hessian[keep] @ weight.T).T
    difference = weight.clone()
    difference[:, keep] -= kept_weight
    return float((difference @ hessian * difference).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_channel_per_step_is_brute_force_greedy(seed):
    weight, inputs = problem(8, 5, 40, seed)
    gram = inputs.T @ inputs
    for num_keep in range(1, 9):
        kept = set(range(8))
        while len(kept) > num_keep:  # each step drops the channel whose loss the refit repairs best
            kept.remove(min(sorted(kept), key=lambda channel: refit_error(weight, inputs, kept - {channel})))
        chosen = om.neurons_kept_by_reconstruction(weight, gram, num_keep, max_steps=8)
        assert chosen.tolist() == sorted(kept)


def test_one_step_drops_the_cheapest_channels_at_the_full_set():
    weight, inputs = problem(7, 4, 30, 3)
    costs = [refit_error(weight, inputs, [c for c in range(7) if c != channel]) for channel in range(7)]
    cheapest = sorted(range(7), key=costs.__getitem__)[:3]
    chosen = om.neurons_kept_by_reconstruction(weight, inputs.T @ inputs, 4, max_steps=1)
    assert chosen.tolist() == sorted(set(range(7)) - set(cheapest))


def test_blocks_are_dropped_jointly_and_come_close_to_the_best_subset():
    weight, inputs = problem(8, 5, 40, 4)
    gram = inputs.T @ inputs
    best = min(refit_error(weight, inputs, keep) for keep in itertools.combinations(range(8), 4))
    for steps in (2, 4):
        chosen = om.neurons_kept_by_reconstruction(weight, gram, 4, max_steps=steps)
        assert chosen.shape == (4,)
        assert refit_error(weight, inputs, chosen.tolist()) <= 1.5 * best


def test_a_channel_the_others_reproduce_is_dropped_before_a_large_independent_one():
    # Channel 1 copies channel 0 with a larger weight: ranked alone it looks the most important, but once the
    # other copy is refitted its loss costs nothing. A score ranks channels alone and would keep both copies.
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(200, 4, generator=generator, dtype=F64)
    inputs[:, 1] = inputs[:, 0]
    weight = torch.tensor([[1.0, 3.0, 0.8, 0.6], [0.5, 2.0, -0.7, 0.4]], dtype=F64)
    chosen = om.neurons_kept_by_reconstruction(weight, inputs.T @ inputs, 3, max_steps=1)
    assert len({0, 1} & set(chosen.tolist())) == 1
    assert {2, 3} <= set(chosen.tolist())


def test_selection_ignores_the_scale_of_the_gram_and_of_the_weight():
    weight, inputs = problem(10, 3, 50, 6)
    gram = inputs.T @ inputs
    reference = om.neurons_kept_by_reconstruction(weight, gram, 6)
    assert torch.equal(om.neurons_kept_by_reconstruction(7.0 * weight, 1e-3 * gram, 6), reference)


def test_dead_channels_go_first_and_keeping_all_keeps_all():
    weight, inputs = problem(6, 3, 30, 7)
    inputs[:, [2, 4]] = 0.0  # never active: the damping keeps the system invertible
    gram = inputs.T @ inputs
    assert om.neurons_kept_by_reconstruction(weight, gram, 4).tolist() == [0, 1, 3, 5]
    assert om.neurons_kept_by_reconstruction(weight, gram, 6).tolist() == list(range(6))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_keep": 0}, "num_keep"),
        ({"num_keep": 7}, "num_keep"),
        ({"damping": 0.0}, "damping"),
        ({"max_steps": 0}, "max_steps"),
        ({"input_gram": torch.zeros(5, 5, dtype=F64)}, "input_gram"),
        ({"input_gram": torch.full((6, 6), float("nan"), dtype=F64)}, "finite"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    weight, inputs = problem(6, 3, 20, 8)
    arguments = {"output_weight": weight, "input_gram": inputs.T @ inputs, "num_keep": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        om.neurons_kept_by_reconstruction(**arguments)


def test_the_first_layer_keeps_the_neurons_chosen_from_a_plain_forward():
    # The first layer's input is the embedding, the same in the dense model and during pruning: its selection can be
    # recomputed from transformers' own forward. Pruned gate rows are the dense rows kept (only down_proj is refitted).
    model = make_tiny_model("llama_gqa", num_hidden_layers=2)
    calibration = torch.randint(3, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    mlp = model.model.layers[0].mlp
    gram = torch.zeros(mlp.down_proj.in_features, mlp.down_proj.in_features, dtype=F64)

    def on_down(module, args):
        nonlocal gram
        rows = args[0].reshape(-1, args[0].shape[-1]).double()
        gram += rows.T @ rows

    handle = mlp.down_proj.register_forward_pre_hook(on_down)
    with torch.no_grad():
        model(input_ids=calibration, use_cache=False)
    handle.remove()
    dense_gate = mlp.gate_proj.weight.detach().clone()
    config = OlicaConfig(ratio=0.3, layer_allocation="uniform")
    result = prune_model(model, config, calibration, progress=False,
                         layer_algorithm=reconstruction.reconstruction_algorithm())
    pruned_gate = result.model.model.layers[0].mlp.gate_proj.weight
    expected = reconstruction.neurons_kept_by_reconstruction(mlp.down_proj.weight, gram, pruned_gate.shape[0])
    torch.testing.assert_close(pruned_gate, dense_gate[expected], rtol=0, atol=0)
