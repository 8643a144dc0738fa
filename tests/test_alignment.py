"""The loss terms: the energy alignment term's pure functions (weights, λ schedule, term, centering, DDP
reduction) and a vector-valued term through the generic tracker of the trainer hooks."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

import mace  # noqa: F401  (before e3nn/torch users)
import torch

from protoalign_cli.terms.base import (
    AtomTargets,
    LossTerm,
    ScheduleSettings,
    TermValue,
    lambda_at_epoch,
    reduce_weighted_mean,
)
from protoalign_cli.terms.energy_alignment import (
    AlignmentSettings,
    alignment_term,
    atom_targets_and_weights,
    centered_residual,
)
from protoalign_cli.terms.weighting import distance_weights, spread_weights


def test_lambda_schedule_warmup_and_decays():
    plain = AlignmentSettings(weight=0.5)
    assert [lambda_at_epoch(e, plain) for e in (0, 3, 100)] == [0.5, 0.5, 0.5]
    warm = AlignmentSettings(weight=0.4, warmup_epochs=4)
    assert [lambda_at_epoch(e, warm) for e in range(6)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    linear = AlignmentSettings(weight=1.0, warmup_epochs=2, decay="linear", decay_epochs=4)
    assert [lambda_at_epoch(e, linear) for e in range(8)] == pytest.approx([0, 0.5, 1, 0.75, 0.5, 0.25, 0, 0])
    cosine = AlignmentSettings(weight=2.0, decay="cosine", decay_epochs=2)
    assert [lambda_at_epoch(e, cosine) for e in range(4)] == pytest.approx([2.0, 1.0, 0.0, 0.0])


def test_distance_weights_hard_and_gaussian():
    distance = np.array([0.0, 1.0, 2.0, 3.0])
    radius = np.array([1.0, 1.0, 1.0, 1.0])
    assert distance_weights(distance, radius, 2.0, "hard").tolist() == [1, 1, 1, 0]
    gaussian = distance_weights(distance, radius, 2.0, "gaussian")
    assert gaussian == pytest.approx(np.exp(-0.5 * (distance / 2.0) ** 2))
    assert np.all(np.diff(gaussian) < 0)


def test_zero_radius_prototype_weights_only_exact_matches():
    distance = np.array([0.0, 1e-9])
    radius = np.zeros(2)
    assert distance_weights(distance, radius, 1.0, "hard").tolist() == [1.0, 0.0]
    assert distance_weights(distance, radius, 1.0, "gaussian").tolist() == [1.0, 0.0]


def test_spread_weights():
    std = np.array([0.0, 0.05, 0.1])
    assert spread_weights(std, None).tolist() == [1, 1, 1]
    assert spread_weights(std, 0.05) == pytest.approx([1.0, 0.5, 0.2])


def test_targets_and_weights_from_assignment():
    settings = AlignmentSettings(weighting="hard", cutoff=1.0, spread_scale=0.1)
    prototype_id = np.array([1, 0, -1, 1])
    distance = np.array([0.5, 3.0, np.inf, 1.5])
    target, weight = atom_targets_and_weights(
        prototype_id, distance, radius=np.array([2.0, 1.0]), energy_mean=np.array([-0.3, 0.7]),
        energy_std=np.array([0.0, 0.1]), settings=settings,
    )
    assert target.tolist() == [0.7, -0.3, 0.0, 0.7]
    assert weight.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])


def _batch(seed=0, n=12, n_elements=3):
    rng = np.random.default_rng(seed)
    energy = torch.tensor(rng.normal(size=n), requires_grad=True)
    target = torch.tensor(rng.normal(size=n))
    weight = torch.tensor(rng.uniform(0.1, 1.0, size=n))
    element = torch.tensor(rng.integers(0, n_elements, size=n))
    return energy, target, weight, element


def test_absolute_term_is_weighted_mean_square_with_its_gradient():
    energy, target, weight, element = _batch()
    term, square_sum, weight_sum = alignment_term(energy, target, weight, element, 3, "absolute", ddp=False)
    residual = (energy - target).detach()
    expected = float((weight * residual**2).sum() / weight.sum())
    assert term.item() == pytest.approx(expected)
    assert float(square_sum) / float(weight_sum) == pytest.approx(expected)
    term.backward()
    assert energy.grad.numpy() == pytest.approx((2 * weight * residual / weight.sum()).numpy())


def test_centered_term_ignores_per_element_offsets_absolute_does_not():
    energy, target, weight, element = _batch(seed=1)
    offset = torch.tensor([5.0, -2.0, 0.3])[element]
    with torch.no_grad():
        centered = alignment_term(energy, target, weight, element, 3, "centered", ddp=False)[0].item()
        shifted = alignment_term(energy + offset, target, weight, element, 3, "centered", ddp=False)[0].item()
        absolute = alignment_term(energy, target, weight, element, 3, "absolute", ddp=False)[0].item()
        absolute_shifted = alignment_term(energy + offset, target, weight, element, 3, "absolute", ddp=False)[0].item()
    assert shifted == pytest.approx(centered, rel=1e-12)
    assert absolute_shifted > 2 * absolute
    assert centered < absolute


def test_centered_residual_has_zero_weighted_mean_per_element():
    energy, target, weight, element = _batch(seed=2)
    residual = centered_residual((energy - target).detach(), weight, element, 4)
    for e in range(3):
        mask = element == e
        assert float((weight[mask] * residual[mask]).sum()) == pytest.approx(0.0, abs=1e-12)


def test_zero_weights_give_zero_term_and_zero_gradient():
    energy, target, _, element = _batch()
    term, _, weight_sum = alignment_term(energy, target, torch.zeros(12, dtype=torch.float64), element, 3,
                                         "centered", ddp=False)
    assert term.item() == 0.0 and weight_sum.item() == 0.0
    term.backward()
    assert torch.all(energy.grad == 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank, world_size, port, energy, target, weight, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mine = slice(0, 4) if rank == 0 else slice(4, None)  # unequal shares of atoms and of weight
        theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)  # a parameter shared by the ranks
        residual = theta * energy[mine] - target[mine]
        term = reduce_weighted_mean((weight[mine] * residual**2).sum(), weight[mine].sum(), ddp=True)
        term.backward()
        grad = theta.grad.clone()
        dist.all_reduce(grad)  # what DDP does to parameter gradients: sum over ranks ...
        queue.put((float(term), float(grad) / world_size))  # ... divided by the world size
    finally:
        dist.destroy_process_group()


def test_ddp_reduction_gives_the_gradient_of_the_global_weighted_mean():
    """Two CPU (gloo) ranks holding different atoms: DDP-averaged gradient == gradient of the global term."""
    import torch.multiprocessing as mp

    energy, target, weight, _ = _batch(seed=3, n=12)
    energy = energy.detach()
    queue = mp.get_context("fork").SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), energy, target, weight, queue), nprocs=2,
                       start_method="fork")
    results = [queue.get() for _ in range(2)]
    theta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    global_term = (weight * (theta * energy - target) ** 2).sum() / weight.sum()
    global_term.backward()
    assert results[0][1] == pytest.approx(float(theta.grad), rel=1e-12)
    assert results[1][1] == pytest.approx(float(theta.grad), rel=1e-12)
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(global_term.item(), rel=1e-12)


class ToyLatentTerm(LossTerm):
    """A toy vector-valued term (the shape of issue 13's latent term): Σ w |h − h*|² / Σ w over 2 latent columns."""

    name = "toy_latent"
    option_prefix = "--toy"
    sum_names = ("weighted_square_sum", "weight_sum")
    lambda_key = "toy_lambda"
    settings_key = "toy_settings"
    log_name = "toy"

    @classmethod
    def build(cls, settings, atoms, prototypes):
        raise NotImplementedError("the test builds its targets by hand")

    def compute(self, batch):
        residual = batch.pred["node_feats"][:, :2] - batch.target
        square_sum = (batch.weight * residual.square().sum(dim=1)).sum()
        term = reduce_weighted_mean(square_sum, batch.weight.sum(), batch.ddp)
        return TermValue(term, {"weighted_square_sum": square_sum.detach(), "weight_sum": batch.weight.sum()})

    def summarize(self, sums):
        return {"toy": sums["weighted_square_sum"] / sums["weight_sum"], "toy_weight": sums["weight_sum"]}

    def format_value(self, record):
        return f"{record['toy']:.3f}"

    def describe(self):
        return "toy"


def test_a_vector_valued_term_runs_through_the_generic_tracker(tmp_path):
    """Per-atom target vectors (width 2) looked up by configuration, λ·term added, sums logged per phase."""
    import json

    from protoalign_cli.mace.trainer_hooks import TermTracker, configuration_index

    numbers = np.array([1, 8, 1, 6, 1])  # two configurations: H O H | C H
    positions = np.arange(15, dtype=np.float64).reshape(5, 3)
    offsets = np.array([0, 3, 5])
    targets = AtomTargets(np.arange(10, dtype=np.float64).reshape(5, 2), np.array([1.0, 1.0, 0.0, 0.5, 0.5]))
    term = ToyLatentTerm(ScheduleSettings(weight=2.0, warmup_epochs=1), targets)
    tracker = TermTracker([term], configuration_index(numbers, positions, offsets, "float64"), tmp_path / "log.jsonl")
    model = type("Model", (), {"heads": ["Default"], "atomic_numbers": torch.tensor([1, 6, 8])})()
    tracker.attach_model(model)

    class Batch(dict):
        num_graphs = 2

    order = [3, 4, 0, 1, 2]  # the batch holds the second configuration first
    element = torch.tensor([{1: 0, 6: 1, 8: 2}[int(z)] for z in numbers[order]])
    ref = Batch(positions=torch.tensor(positions[order]), node_attrs=torch.nn.functional.one_hot(element, 3),
                ptr=torch.tensor([0, 2, 5]), batch=torch.tensor([0, 0, 1, 1, 1]))
    feats = torch.zeros(5, 4, dtype=torch.float64, requires_grad=True)
    base = torch.tensor(1.0, dtype=torch.float64)
    expected = float((targets.weight[order] * (targets.target[order] ** 2).sum(axis=1)).sum() / targets.weight.sum())

    tracker.begin_training(0, {})
    tracker.begin_epoch(0)  # λ = 0 in the warmup's first epoch: the loss is returned untouched
    with tracker.phase("train"):
        assert tracker.add_terms(base, ref, {"node_feats": feats}, ddp=False) is base
    tracker.begin_epoch(1)  # λ = 2
    with tracker.phase("train"):
        loss = tracker.add_terms(base, ref, {"node_feats": feats}, ddp=False)
    tracker.flush()
    assert loss.item() == pytest.approx(1.0 + 2.0 * expected)
    loss.backward()
    assert feats.grad[:, 2:].abs().sum() == 0 and feats.grad[:, :2].abs().sum() > 0
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[0] == {"event": "start", "start_epoch": 0,
                          "toy_settings": {"weight": 2.0, "warmup_epochs": 1, "decay": "none", "decay_epochs": None}}
    assert records[1]["initial"] and "train" not in records[1]  # no evaluation before training here
    epochs = records[2:]
    assert [r["toy_lambda"] for r in epochs] == [0.0, 2.0]
    for record in epochs:
        assert record["train"]["toy"] == pytest.approx(expected)
        assert record["train"]["graphs"] == 2 and record["train"]["graphs_missing"] == 0
    assert tracker.log_line(epochs[1]) == f"protoalign epoch 1: toy_lambda=2 train_toy={expected:.3f}"
