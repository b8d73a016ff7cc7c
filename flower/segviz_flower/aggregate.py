"""SegViz aggregation in numpy, the same rule as the Rust ``segviz_fed::strategy``.

A *state* maps each parameter path to a :class:`~segviz_flower.segviz_format.Tensor`
(float32 values plus classification). An :class:`Update` is one client's reply to a training
round: its name, its tasks, its number of training examples and its local state (the
representation block, BatchNorm included, and the heads of its own tasks).

The rule (``segviz-fed/src/strategy/aggregate.rs``, docs/flower.md):

* weights ``w_u`` are ``num_examples`` (``weighting="examples"``) or 1 (``"uniform"``); an
  update whose weight is 0 contributes nothing;
* every tensor that some update carries becomes the weighted mean over the updates carrying
  it, accumulated in float64 (``sum(w_u * x_u)`` in the order of ``updates``, then divided by
  ``sum(w_u)``) and rounded once to float32. This covers the representation block under every
  strategy (under FedBN the BatchNorm means are kept in the global model but never sent back
  after round 1) and the heads (averaged among the updates that carry them: their owners);
* a tensor no update carries keeps its global value.

FedAvg, FedBN and FedProx therefore aggregate identically; they differ in what a node receives
(:func:`client_view`) and, for FedProx, in the node's local loss.

The partial-label rule ("+ PL", ``segviz-fed/src/strategy/partial_labels.rs``) on top of FedAvg
or FedBN (``fedavg_pl``, ``fedbn_pl``) sends *every* head to *every* node (:func:`node_view`)
and aggregates as the wrapped strategy: since every reply then carries every head, each head
becomes the mean over all updates; with an owner weight ``a`` (``head-owner-weight``, default
1) each head is instead ``a`` times the mean over its owners plus ``1 - a`` times the mean
over the others (:func:`owner_weighted_head`). The representation follows the wrapped strategy (FedBN:
its BatchNorm withheld after round 1). The nodes train the heads of the tasks they did not
annotate with the exclusion and distillation terms, whose settings travel in the ``train``
config (:func:`distillation_weight_at`).

A server learning rate ``eta`` (``server-learning-rate``, default 1: the plain average;
``segviz-fed/src/strategy/server_rate.rs``) then moves every trainable, non-BatchNorm tensor of
the representation block from its global value ``g`` along the averaged update:
``g + eta * (mean - g)``, computed in float64 from the float32 mean and rounded once
(:func:`apply_server_learning_rate`). Heads and BatchNorm tensors are not touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .segviz_format import Tensor

PARTIAL_LABEL_SUFFIX = "_pl"
"""Appended to a strategy's name for the partial-label rule, as in ``strategy_by_name``."""

BASE_STRATEGIES = ("fedavg", "fedbn", "fedprox")
"""The strategies without the partial-label rule (the paper's SegViz head rule)."""

PARTIAL_LABEL_STRATEGIES = ("fedavg_pl", "fedbn_pl")
"""The strategies with the partial-label rule that the ServerApp runs."""

STRATEGIES = BASE_STRATEGIES + PARTIAL_LABEL_STRATEGIES
"""Strategy names, as in ``segviz_fed::strategy::strategy_by_name``."""

WEIGHTINGS = ("examples", "uniform")
"""Weightings, as in ``segviz_fed::strategy::Weighting``."""

State = Mapping[str, Tensor]


class AggregationError(ValueError):
    """A round that cannot be aggregated (no update, or updates that disagree)."""


@dataclass
class Update:
    """One client's training reply."""

    client: str
    tasks: list[str]
    num_examples: int
    tensors: dict[str, Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


def check_strategy(strategy: str) -> str:
    """Returns ``strategy`` if it names a SegViz strategy, else raises ``ValueError``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    return strategy


def is_partial_label(strategy: str) -> bool:
    """Whether ``strategy`` (a checked name) has the partial-label rule."""
    return check_strategy(strategy) in PARTIAL_LABEL_STRATEGIES


def base_strategy(strategy: str) -> str:
    """The strategy that ``strategy`` wraps (``fedbn`` for ``fedbn_pl``), or ``strategy`` itself."""
    if is_partial_label(strategy):
        return strategy[: -len(PARTIAL_LABEL_SUFFIX)]
    return strategy


def distillation_weight_at(round_: int, rounds: int, weight: float, start: float) -> float:
    """The distillation weight of ``round_`` (1-based) out of ``rounds``: linear from
    ``start * weight`` in round 1 to ``weight`` in the last round (``weight`` when there is one
    round). The same float64 arithmetic as ``PartialLabelConfig::distillation_weight_at``.
    """
    t = 1.0 if rounds <= 1 else float(max(round_ - 1, 0)) / float(rounds - 1)
    t = min(max(t, 0.0), 1.0)
    return weight * (start + (1.0 - start) * t)


def check_weighting(weighting: str) -> str:
    """Returns ``weighting`` if it names a SegViz weighting, else raises ``ValueError``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    return weighting


def update_weight(update: Update, weighting: str) -> float:
    """The weight of ``update`` in every mean: its examples, or 1 under uniform weighting."""
    check_weighting(weighting)
    return float(update.num_examples) if weighting == "examples" else 1.0


def average(
    round_: int,
    updates: Sequence[Update],
    weighting: str,
    weight: Callable[[Update], float] | None = None,
    select: Callable[[str, Tensor], bool] | None = None,
) -> dict[str, Tensor]:
    """Weighted mean, over the updates that carry it, of every tensor of ``updates``.

    Mirrors ``aggregate::average`` (``aggregate::average_by`` when ``weight`` is given, and
    only the tensors ``select`` accepts when it is given): float64 sums in the order of
    ``updates``, one rounding to float32. The classification of each result is that of the
    first update carrying the tensor. Updates that disagree on a tensor's shape raise
    :class:`AggregationError` naming the client and the path.
    """
    sums: dict[str, tuple[np.ndarray, float, Tensor]] = {}
    for u in updates:
        w = update_weight(u, weighting) if weight is None else weight(u)
        if not w > 0.0:
            continue
        for path, t in u.tensors.items():
            if select is not None and not select(path, t):
                continue
            entry = sums.get(path)
            if entry is None:
                acc = np.zeros(t.data.shape, dtype=np.float64)
                entry = (acc, 0.0, t)
            acc, total, template = entry
            if template.data.shape != t.data.shape:
                raise AggregationError(
                    f"round {round_}: client {u.client} sent {path} with shape "
                    f"{list(t.data.shape)}, others {list(template.data.shape)}"
                )
            # In place, element by element: acc += w * x, exactly as the Rust loop does.
            acc += w * t.data.astype(np.float64)
            sums[path] = (acc, total + w, template)
    return {
        path: Tensor((acc / total).astype(np.float32), template.cls)
        for path, (acc, total, template) in sums.items()
    }


def owner_weighted_head(
    round_: int,
    updates: Sequence[Update],
    weighting: str,
    task: str,
    owner_weight: float,
) -> dict[str, Tensor]:
    """The head of ``task`` as ``owner_weight`` times the mean over its owners' updates plus
    ``1 - owner_weight`` times the mean over the other updates carrying it, each mean weighted
    by ``weighting``; the plain mean when only owners or only others carry it. Mirrors
    ``strategy::partial_labels::owner_weighted_head``: one float64 weighted mean with weights
    ``owner_weight * w / W_owners`` and ``(1 - owner_weight) * w / W_others``.
    """

    def is_head(t: Tensor) -> bool:
        return t.cls.is_head and t.cls.task == task

    def carries(u: Update) -> bool:
        return any(is_head(t) for t in u.tensors.values())

    def owns(u: Update) -> bool:
        return task in u.tasks

    def total(owner: bool) -> float:
        s = 0.0
        for u in updates:
            if carries(u) and owns(u) == owner:
                w = update_weight(u, weighting)
                if w > 0.0:
                    s += w
        return s

    owners, others = total(True), total(False)

    def weight(u: Update) -> float:
        w = update_weight(u, weighting)
        if owners > 0.0 and others > 0.0:
            return owner_weight * w / owners if owns(u) else (1.0 - owner_weight) * w / others
        return w

    return average(round_, updates, weighting, weight=weight, select=lambda _p, t: is_head(t))


def aggregate(
    round_: int,
    global_state: State,
    updates: Sequence[Update],
    strategy: str,
    weighting: str,
    owner_weight: float | None = None,
    server_learning_rate: float = 1.0,
) -> dict[str, Tensor]:
    """The new global state after ``round_`` (1-based) from ``updates``, in their order.

    Mirrors ``AggregationStrategy::aggregate_fit`` of the Rust ``FedAvg``, ``FedBn`` and
    ``FedProx``, and of ``PartialLabels`` around them (the wrapped strategy's aggregation,
    then, when ``owner_weight`` is given, each head re-averaged by :func:`owner_weighted_head`),
    and of ``ServerLearningRate`` around them when ``server_learning_rate`` is not 1: see the
    module documentation. Beyond the Rust checks, an update whose tensor
    shape differs from the global tensor's is refused too (the Rust code would silently
    replace the global shape). No update at all raises :class:`AggregationError`.
    """
    check_strategy(strategy)
    check_weighting(weighting)
    if not updates:
        raise AggregationError(f"round {round_}: no client finished the round")
    # FedAvg/FedProx average every representation tensor; FedBN averages the non-BatchNorm
    # ones for the nodes and the BatchNorm ones as a stand-alone summary: the same sums.
    # Heads are averaged among the updates that carry them. Hence one pass over all tensors.
    averaged = average(round_, updates, weighting)
    for path, t in averaged.items():
        g = global_state.get(path)
        if g is not None and g.data.shape != t.data.shape:
            client = next(
                u.client for u in updates if path in u.tensors and u.tensors[path].data.shape == t.data.shape
            )
            raise AggregationError(
                f"round {round_}: client {client} sent {path} with shape "
                f"{list(t.data.shape)}, the global model has {list(g.data.shape)}"
            )
    if owner_weight is not None and is_partial_label(strategy):
        for task in head_tasks(global_state):
            averaged.update(owner_weighted_head(round_, updates, weighting, task, owner_weight))
    if server_learning_rate != 1.0:
        apply_server_learning_rate(global_state, averaged, server_learning_rate)
    next_state = dict(global_state)
    next_state.update(averaged)
    return next_state


def check_server_learning_rate(rate: float) -> float:
    """``rate`` when it is a finite positive number; raises ``ValueError`` otherwise."""
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0.0):
        raise ValueError(f"the server learning rate must be a finite positive number, not {rate!r}")
    return float(rate)


def apply_server_learning_rate(global_state: State, averaged: dict[str, Tensor], rate: float) -> None:
    """``averaged[p] = g + rate * (averaged[p] - g)`` in place, for every trainable,
    non-BatchNorm representation tensor whose global value ``g`` has the same shape. Mirrors
    ``server_rate::apply_server_learning_rate``: float64 from the float32 values, one rounding.
    """
    check_server_learning_rate(rate)
    for path, t in averaged.items():
        cls = t.cls
        if not cls.is_representation or not cls.trainable or cls.batch_norm:
            continue
        g = global_state.get(path)
        if g is None or g.data.shape != t.data.shape:
            continue
        g64 = g.data.astype(np.float64)
        averaged[path] = Tensor((g64 + rate * (t.data.astype(np.float64) - g64)).astype(np.float32), cls)


def head_tasks(state: State) -> list[str]:
    """The tasks that ``state`` has a head for, sorted."""
    return sorted({t.cls.task for t in state.values() if t.cls.is_head})


def sends_tensor(strategy: str, round_: int, tensor: Tensor) -> bool:
    """Whether a node starting ``round_`` receives ``tensor`` under ``strategy``, heads aside.

    Heads are always sent, to their owners only, or to every node under the partial-label
    rule (:func:`node_view` picks them per node, as the Rust strategies' ``configure_fit``
    does); under FedBN (``fedbn_pl`` included) the representation's BatchNorm tensors are sent
    in round 1 only, so that every node starts from the same initial model and then keeps its
    own normalisation.
    """
    check_strategy(strategy)
    if tensor.cls.is_head:
        return True
    if base_strategy(strategy) == "fedbn":
        return round_ == 1 or not tensor.cls.batch_norm
    return True


def client_view(global_state: State, strategy: str, round_: int) -> dict[str, Tensor]:
    """What the nodes receive at the start of ``round_`` (1-based), and for evaluation
    after round ``round_ - 1``, every head included: see :func:`sends_tensor`. Each node then
    gets :func:`node_view` of it.
    """
    return {p: t for p, t in global_state.items() if sends_tensor(strategy, round_, t)}


def node_view(view: State, strategy: str, tasks: Sequence[str]) -> dict[str, Tensor]:
    """What a node owning ``tasks`` receives of ``view`` (a :func:`client_view`): the
    representation part and the heads of its own tasks or, under the partial-label rule,
    every head.
    """
    every_head = is_partial_label(strategy)
    return {p: t for p, t in view.items() if not t.cls.is_head or every_head or t.cls.task in tasks}


def aggregate_metrics(results: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """Each metric's mean over ``results`` (pairs of examples and metrics), weighted by
    ``max(examples, 1)``, ignoring non-finite values: ``AggregationStrategy::aggregate_evaluate``.
    """
    sums: dict[str, tuple[float, float]] = {}
    for n, metrics in results:
        w = float(max(n, 1))
        for k, v in metrics.items():
            v = float(v)
            if np.isfinite(v):
                s, t = sums.get(k, (0.0, 0.0))
                sums[k] = (s + w * v, t + w)
    return {k: s / t for k, (s, t) in sorted(sums.items())}
