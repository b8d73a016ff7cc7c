"""The SegViz ServerApp: SegViz aggregation over Flower 1.42, with native Rust nodes.

The nodes (``cargo run --release --example flower_node``) speak the Fleet API to a stock
SuperLink; this ServerApp runs inside the SuperLink's deployment and drives the rounds with
the message contract of docs/flower.md:

1. load ``initial-model`` (a ``.segviz`` file) and wait until ``min-nodes`` nodes are
   connected (at most ``node-wait-timeout`` seconds);
2. ask every node not yet known who it is (a ``query`` message: its site name and tasks); a
   node whose site name another connected node already holds is refused for the run, with an
   error in the log and in every round of ``history.json``;
3. each round, send a ``train`` message to every identified node: ``arrays`` (the global
   model as the strategy shows it to nodes, with only the heads of the node's own tasks, as
   the Rust server and the paper do, or every head under a partial-label strategy,
   ``fedavg_pl`` or ``fedbn_pl``) and ``config`` (under a partial-label strategy with the
   settings of the nodes' exclusion and distillation terms); wait at most ``round-timeout`` seconds,
   or ``straggler-timeout`` seconds once ``min-nodes`` replies are in
   (:mod:`segviz_flower.exchange`);
4. check every reply (the ``segviz`` record's classification against the arrays and the
   global model, heads of the node's own tasks only unless the strategy is a partial-label
   one, finite float32 values, ``num-examples``); error replies (a node that died or
   failed) and malformed ones are left out of the round with a logged reason, and the round
   closes with the others; no valid reply at all fails the run;
5. aggregate with the SegViz rule (:mod:`segviz_flower.aggregate`), updates sorted by client
   name;
6. send ``evaluate`` messages (the view the next round's training will start from) and
   average the metrics weighted by ``num-examples``;
7. write ``<out-dir>/history.json`` then ``<out-dir>/global.segviz``, atomically.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Iterable, Mapping

import flwr
import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from .exchange import BoundedGrid
from .aggregate import (
    AggregationError,
    head_tasks,
    Update,
    aggregate,
    aggregate_metrics,
    check_strategy,
    check_weighting,
    client_view,
    distillation_weight_at,
    is_partial_label,
    node_view,
)
from .segviz_format import (
    Checkpoint,
    SegVizFormatError,
    Tensor,
    TensorClass,
    classification_from_json,
    read_checkpoint,
    write_atomically,
    write_checkpoint,
)

STATE_FORMAT = "segviz-state/1"
"""The ``format`` a node declares in its ``segviz`` record."""

GLOBAL_FILE = "global.segviz"
HISTORY_FILE = "history.json"

NODE_HINT = "start the SegViz nodes with `cargo run --release --example flower_node`"


class ConfigError(ValueError):
    """A run configuration value that the ServerApp cannot use."""


class SegVizRunError(RuntimeError):
    """The federation cannot go on (no node, no valid reply, a bad initial model...).

    Raised out of the ServerApp, Flower marks the run failed with this message as its
    details (``flwr ls``) and logs it in the ``flwr run --stream`` output.
    """


class MalformedReply(ValueError):
    """A node reply that breaks the contract of docs/flower.md; the message says how."""


# --------------------------------------------------------------------------------------------
# Run configuration
# --------------------------------------------------------------------------------------------


def _number(
    config: Mapping[str, Any],
    key: str,
    kind: type,
    minimum: float,
    default: Any,
    *,
    maximum: float = math.inf,
    above: bool = False,
) -> Any:
    """``config[key]`` (or ``default``) as ``kind``, in ``[minimum, maximum]``, or in
    ``(minimum, maximum]`` when ``above``; raises :class:`ConfigError` otherwise."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"run config {key} must be a number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise ConfigError(f"run config {key} must be an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    if above and not (math.isfinite(value) and value > minimum):
        raise ConfigError(f"run config {key} must be greater than {minimum}, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"run config {key} must be at least {minimum}, got {value!r}")
    if value > maximum:
        raise ConfigError(f"run config {key} must be at most {maximum}, got {value!r}")
    return value


def _owner_weight(config: Mapping[str, Any]) -> float | None:
    """``head-owner-weight``: a number in [0, 1] (default 1: each head from its owners), or
    ``"plain"`` for one plain mean of each head over every node."""
    if config.get("head-owner-weight") == "plain":
        return None
    return _number(config, "head-owner-weight", float, 0.0, 1.0, maximum=1.0)


def _absolute_path(config: Mapping[str, Any], key: str) -> Path:
    value = config.get(key, "")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"run config {key} is required: pass it with -c '{key}=\"/absolute/path\"' "
            "(the path is on the SuperLink's machine)"
        )
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ConfigError(
            f"run config {key} must be an absolute path, got {value!r}: the ServerApp runs in a "
            "process started by the SuperLink, whose working directory is not yours"
        )
    return path


@dataclass(frozen=True)
class Settings:
    """The run configuration (``[tool.flwr.app.config]`` and ``flwr run -c``), checked."""

    num_server_rounds: int
    local_epochs: int
    strategy: str
    weighting: str
    proximal_mu: float
    min_nodes: int
    initial_model: Path
    out_dir: Path
    round_timeout: float
    node_wait_timeout: float
    straggler_timeout: float = 0.0
    # The partial-label objective (strategies fedavg_pl and fedbn_pl), as
    # segviz_fed::partial_labels::PartialLabelConfig.
    exclusion_weight: float = 0.15
    distillation_weight: float = 1.0
    distillation_start: float = 1.0
    distillation_temperature: float = 2.0
    # Share of each head's average taken from its owners (segviz_fed's
    # PartialLabelConfig::owner_weight); None: one plain mean over every node.
    head_owner_weight: float | None = 1.0
    # Distil only where the teacher's organ probability exceeds this (PartialLabelConfig::
    # distillation_threshold); 0: on every voxel the node did not annotate.
    distillation_threshold: float = 0.5
    # Server learning rate on the representation block (segviz_fed's ServerLearningRate):
    # g + eta * (mean - g); 1: the plain average.
    server_learning_rate: float = 1.0

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> "Settings":
        """Reads and checks every key; a bad value raises :class:`ConfigError`."""
        strategy = str(config.get("strategy", "fedbn"))
        weighting = str(config.get("weighting", "examples"))
        try:
            check_strategy(strategy)
            check_weighting(weighting)
        except ValueError as e:
            raise ConfigError(f"run config: {e}") from None
        return cls(
            num_server_rounds=_number(config, "num-server-rounds", int, 1, 2),
            local_epochs=_number(config, "local-epochs", int, 1, 1),
            strategy=strategy,
            weighting=weighting,
            proximal_mu=_number(config, "proximal-mu", float, 0.0, 0.01),
            min_nodes=_number(config, "min-nodes", int, 1, 4),
            initial_model=_absolute_path(config, "initial-model"),
            out_dir=_absolute_path(config, "out-dir"),
            round_timeout=_number(config, "round-timeout", float, 1.0, 600.0),
            node_wait_timeout=_number(config, "node-wait-timeout", float, 0.0, 300.0),
            straggler_timeout=_number(config, "straggler-timeout", float, 0.0, 0.0),
            exclusion_weight=_number(config, "exclusion-weight", float, 0.0, 0.15),
            distillation_weight=_number(config, "distillation-weight", float, 0.0, 1.0),
            distillation_start=_number(config, "distillation-start", float, 0.0, 1.0, maximum=1.0),
            distillation_temperature=_number(config, "distillation-temperature", float, 0.0, 2.0, above=True),
            head_owner_weight=_owner_weight(config),
            distillation_threshold=_number(config, "distillation-threshold", float, 0.0, 0.5, maximum=0.999999),
            server_learning_rate=_number(config, "server-learning-rate", float, 0.0, 1.0, above=True),
        )

    @property
    def partial_labels(self) -> bool:
        """Whether the strategy has the partial-label rule (every head to every node)."""
        return is_partial_label(self.strategy)

    def distillation_weight_at(self, server_round: int) -> float:
        """The distillation weight sent with ``server_round``'s ``train`` instructions: ramped
        linearly from ``distillation-start × distillation-weight`` in round 1 to
        ``distillation-weight`` in round ``num-server-rounds``."""
        return distillation_weight_at(
            server_round, self.num_server_rounds, self.distillation_weight, self.distillation_start
        )


def load_initial_model(path: Path) -> Checkpoint:
    """Reads the initial model; a missing, corrupt or unusable file raises an error naming it."""
    if not path.is_file():
        raise SegVizFormatError(f"{path}: initial-model does not exist or is not a file")
    checkpoint = read_checkpoint(path)
    if not checkpoint.tensors:
        raise SegVizFormatError(f"{path}: the model has no tensor")
    tasks = checkpoint.config.get("tasks")
    for p, t in checkpoint.tensors.items():
        if not np.all(np.isfinite(t.data)):
            raise SegVizFormatError(f"{path}: tensor {p} has non-finite values")
        if t.cls.is_head and isinstance(tasks, list) and t.cls.task not in tasks:
            raise SegVizFormatError(
                f"{path}: tensor {p} belongs to task {t.cls.task}, which the configuration's "
                f"tasks {tasks} do not list"
            )
    return checkpoint


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    """Waits until at least ``min_nodes`` nodes are connected; returns their ids.

    Raises :class:`SegVizRunError` after ``timeout`` seconds with fewer.
    """
    start = time.monotonic()
    last_log = -math.inf
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes:
            log(INFO, "%d node(s) connected (min-nodes %d): %s", len(nodes), min_nodes, nodes)
            return nodes
        waited = time.monotonic() - start
        if waited >= timeout:
            raise SegVizRunError(
                f"only {len(nodes)} of the {min_nodes} nodes needed (min-nodes) connected within "
                f"node-wait-timeout = {timeout:g} s; {NODE_HINT}, or lower min-nodes"
            )
        if waited - last_log >= 10.0:
            log(INFO, "Waiting for nodes: %d connected, %d needed (%.0f s)", len(nodes), min_nodes, waited)
            last_log = waited
        time.sleep(1.0)


# --------------------------------------------------------------------------------------------
# Records <-> SegViz tensors
# --------------------------------------------------------------------------------------------


def to_array_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of float32 C-order arrays named by their SegViz path."""
    return ArrayRecord({p: Array(np.asarray(t.data, dtype=np.float32, order="C")) for p, t in sorted(tensors.items())})


def _metric_number(metrics: Mapping[str, Any], key: str, integer: bool) -> float | int:
    if key not in metrics:
        raise MalformedReply(f"metrics has no {key}")
    v = metrics[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MalformedReply(f"metrics {key} must be a finite number, got {v!r}")
    if integer:
        if float(v) != int(v) or v < 0:
            raise MalformedReply(f"metrics {key} must be a non-negative integer, got {v!r}")
        return int(v)
    return float(v)


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def parse_train_reply(
    content: RecordDict, global_state: Mapping[str, Tensor], *, every_head: bool = False
) -> Update:
    """Checks a ``train`` reply against docs/flower.md and the global model.

    Raises :class:`MalformedReply` saying what is wrong: a missing record or key, a
    classification that does not match the arrays or the global model, a head of a task that
    is not the node's (allowed with ``every_head``: under a partial-label strategy every node
    trains every head), a tensor of the wrong shape or dtype, or a non-finite value.
    """
    for name, kind in (("arrays", "array_records"), ("metrics", "metric_records"), ("segviz", "config_records")):
        if name not in getattr(content, kind):
            raise MalformedReply(f"no {name} record ({kind.replace('_', ' ')[:-1]})")
    arrays = content.array_records["arrays"]
    metrics = content.metric_records["metrics"]
    segviz = content.config_records["segviz"]

    client, tasks = _identity(segviz, require_tasks=False)
    try:
        classification = classification_from_json(segviz.get("classification"), f"client {client}")
    except SegVizFormatError as e:
        raise MalformedReply(str(e)) from None

    keys, classified = set(arrays.keys()), set(classification)
    if keys != classified:
        missing = sorted(classified - keys)[:3]
        extra = sorted(keys - classified)[:3]
        raise MalformedReply(
            f"client {client}: arrays and classification name different tensors "
            f"(classified but not sent: {missing}; sent but not classified: {extra})"
        )
    if not keys:
        raise MalformedReply(f"client {client}: arrays is empty")

    tensors: dict[str, Tensor] = {}
    for path in sorted(keys):
        cls: TensorClass = classification[path]
        g = global_state.get(path)
        if g is None:
            raise MalformedReply(f"client {client}: {path} is not a tensor of the global model")
        if cls != g.cls:
            raise MalformedReply(
                f"client {client}: {path} is classified {cls.to_json()}, the global model says {g.cls.to_json()}"
            )
        if cls.is_head and not every_head and cls.task not in tasks:
            raise MalformedReply(f"client {client}: sent the head tensor {path} of task {cls.task}, not one of its tasks {tasks}")
        try:
            data = arrays[path].numpy()
        except Exception as e:  # noqa: BLE001 - any undecodable array is a malformed reply
            raise MalformedReply(f"client {client}: {path} cannot be decoded: {e}") from None
        if data.dtype != np.float32:
            raise MalformedReply(f"client {client}: {path} has dtype {data.dtype}, expected float32")
        if data.shape != g.data.shape:
            raise MalformedReply(
                f"client {client}: {path} has shape {list(data.shape)}, the global model {list(g.data.shape)}"
            )
        if not np.all(np.isfinite(data)):
            raise MalformedReply(f"client {client}: {path} has non-finite values (NaN or infinity)")
        tensors[path] = Tensor(data, cls)

    num_examples = int(_metric_number(metrics, "num-examples", integer=True))
    return Update(
        client=client,
        tasks=list(tasks),
        num_examples=num_examples,
        tensors=tensors,
        metrics=_scalar_metrics(metrics),
    )


@dataclass(frozen=True)
class Identity:
    """Who a node says it is (its reply to a ``query``)."""

    client: str
    tasks: tuple[str, ...]


def parse_query_reply(content: RecordDict) -> Identity:
    """Checks a ``query`` reply: a ``segviz`` record with ``client``, ``tasks`` and ``format``."""
    if "segviz" not in content.config_records:
        raise MalformedReply("no segviz record (config record)")
    client, tasks = _identity(content.config_records["segviz"], require_tasks=True)
    return Identity(client, tuple(tasks))


def _identity(segviz, *, require_tasks: bool) -> tuple[str, list]:
    """The ``format``, ``client`` and ``tasks`` of a reply's ``segviz`` record, checked."""
    fmt = segviz.get("format")
    if fmt != STATE_FORMAT:
        raise MalformedReply(f"segviz format is {fmt!r}, expected {STATE_FORMAT!r}")
    client = segviz.get("client")
    if not isinstance(client, str) or not client:
        raise MalformedReply("segviz client must be a non-empty string")
    tasks = segviz.get("tasks")
    what = "a non-empty list of strings" if require_tasks else "a list of strings"
    if (
        not isinstance(tasks, list)
        or (require_tasks and not tasks)
        or not all(isinstance(t, str) for t in tasks)
    ):
        raise MalformedReply(f"client {client}: segviz tasks must be {what}")
    return client, tasks


def parse_evaluate_reply(content: RecordDict) -> tuple[int, dict[str, float]]:
    """Checks an ``evaluate`` reply: a ``metrics`` record with ``num-examples``."""
    if "metrics" not in content.metric_records:
        raise MalformedReply("no metrics record")
    metrics = content.metric_records["metrics"]
    n = int(_metric_number(metrics, "num-examples", integer=True))
    values = {k: v for k, v in _scalar_metrics(metrics).items() if k != "num-examples"}
    return n, values


def _error_text(msg: Message) -> str:
    return f"error {msg.error.code}: {msg.error.reason}"


# --------------------------------------------------------------------------------------------
# Strategy
# --------------------------------------------------------------------------------------------


class SegVizStrategy(FedAvg):
    """Flower's FedAvg message flow with the SegViz aggregation rule.

    The strategy keeps the full global model (every tensor with its classification); the
    ``arrays`` that Flower's ``Strategy.start`` passes around are only what this strategy
    returns and are not read back. Each round's record goes to ``history.json``.
    """

    def __init__(self, settings: Settings, initial: Checkpoint) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=settings.min_nodes,
            weighted_by_key="num-examples",
            arrayrecord_key="arrays",
            configrecord_key="config",
        )
        self.settings = settings
        self.model_config = initial.config
        # Kept in every saved global model: the preprocessing and window that `predict`
        # needs are in the initial model's metadata (examples/init_model.rs writes them).
        self.initial_metadata = dict(initial.metadata) if isinstance(initial.metadata, dict) else {}
        self.global_state: dict[str, Tensor] = dict(initial.tensors)
        self.history: list[dict[str, Any]] = []
        self._round: dict[str, Any] = {}
        self._sent: list[Message] = []
        self._round_start = time.monotonic()
        self._grid: Any = None  # the Grid of the phase in progress (its last_phase explains closes)
        self.model_tasks = head_tasks(self.global_state)
        # Node id -> identity, from its query reply; node id -> why it is refused for the run.
        self.identities: dict[int, Identity] = {}
        self.refused: dict[int, str] = {}

    # -- Flower hooks -------------------------------------------------------------------------

    def summary(self) -> None:
        s = self.settings
        log(INFO, "\t├──> SegViz: strategy %s, weighting %s%s", s.strategy, s.weighting,
            f", proximal-mu {s.proximal_mu:g}" if s.strategy == "fedprox" else "")
        if s.partial_labels:
            log(INFO, "\t├──> partial labels: exclusion-weight %g, distillation-weight %g (ramped from "
                "%g in round 1), distillation-temperature %g", s.exclusion_weight, s.distillation_weight,
                s.distillation_weight_at(1), s.distillation_temperature)
            log(INFO, "\t├──> head-owner-weight %s, distillation-threshold %g",
                "plain" if s.head_owner_weight is None else f"{s.head_owner_weight:g}",
                s.distillation_threshold)
        if s.server_learning_rate != 1.0:
            log(INFO, "\t├──> server-learning-rate %g on the representation block", s.server_learning_rate)
        log(INFO, "\t├──> initial model %s (%d tensors)", s.initial_model, len(self.global_state))
        log(INFO, "\t├──> min-nodes %d, round-timeout %g s", s.min_nodes, s.round_timeout)
        log(INFO, "\t└──> results in %s", s.out_dir)

    def identify(self, grid: Grid, server_round: int) -> list[int]:
        """Queries the connected nodes not yet known; returns the identified, not refused ones.

        A node whose site name a *connected* node already holds is refused for the run (a
        name whose holder left may be taken over, e.g. by a reinstalled site with a new key).
        """
        connected = sorted(grid.get_node_ids())
        unknown = [n for n in connected if n not in self.identities and n not in self.refused]
        if unknown:
            query = RecordDict({"config": ConfigRecord({"server-round": server_round})})
            self._sent = self._messages(query, unknown, MessageType.QUERY, server_round)
            for node, msg in self._match_replies(grid, grid.send_and_receive(self._sent, timeout=self.settings.round_timeout), "identity (query)"):
                if msg is None:
                    continue
                try:
                    identity = parse_query_reply(msg.content)
                except MalformedReply as e:
                    self._fail(node, f"malformed identity (query) reply: {e}")
                    continue
                self._admit(node, identity, connected)
        for node in connected:
            if node in self.refused:
                self._fail(node, self.refused[node], level=ERROR)
        return [n for n in connected if n in self.identities]

    def _admit(self, node: int, identity: Identity, connected: list[int]) -> None:
        foreign = [t for t in identity.tasks if t not in self.model_tasks]
        if foreign:
            self.refused[node] = (
                f"refused for this run: site {identity.client} has tasks {foreign} that the initial "
                f"model has no head for (its tasks: {self.model_tasks})"
            )
            return
        holder = next((n for n, i in self.identities.items() if i.client == identity.client), None)
        if holder is not None and holder in connected:
            self.refused[node] = (
                f"refused for this run: site name {identity.client!r} is already taken by node "
                f"{holder}; every node needs its own name (flower_node --site-name)"
            )
            log(ERROR, "Node %d %s", node, self.refused[node])
            return
        if holder is not None:
            log(WARNING, "Site %s is now node %d (node %d, which held the name, left)", identity.client, node, holder)
            del self.identities[holder]
        self.identities[node] = identity
        log(INFO, "Node %d is site %s (tasks %s)", node, identity.client, ", ".join(identity.tasks))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One ``train`` message per identified node, each with the heads of its own tasks (every
        head under a partial-label strategy)."""
        self._round_start = time.monotonic()
        self._grid = grid
        self._round = {"round": server_round, "aggregated": [], "failed": [], "train_loss": None, "metrics": {}}
        if not list(grid.get_node_ids()):
            raise SegVizRunError(f"round {server_round}: no node is connected; {NODE_HINT}")
        nodes = self.identify(grid, server_round)
        if not nodes:
            raise SegVizRunError(
                f"round {server_round}: no connected node could be identified; failures: "
                + "; ".join(f"node {f['node_id']}: {f['reason']}" for f in self._round["failed"])
            )
        if len(nodes) < self.settings.min_nodes:
            log(WARNING, "Round %d: only %d identified node(s) connected (min-nodes %d); training with them",
                server_round, len(nodes), self.settings.min_nodes)
        view = client_view(self.global_state, self.settings.strategy, server_round)
        train_config = ConfigRecord(
            {
                "server-round": server_round,
                "num-server-rounds": self.settings.num_server_rounds,
                "local-epochs": self.settings.local_epochs,
                "strategy": self.settings.strategy,
            }
        )
        if self.settings.strategy == "fedprox":
            train_config["proximal-mu"] = float(self.settings.proximal_mu)
        if self.settings.partial_labels:
            train_config["partial-labels"] = 1
            train_config["exclusion-weight"] = float(self.settings.exclusion_weight)
            train_config["distillation-weight"] = float(self.settings.distillation_weight_at(server_round))
            train_config["distillation-temperature"] = float(self.settings.distillation_temperature)
            train_config["distillation-threshold"] = float(self.settings.distillation_threshold)
        log(INFO, "Round %d: training on %d node(s) %s", server_round, len(nodes), nodes)
        self._sent = self._per_node_messages(view, train_config, nodes, MessageType.TRAIN, server_round)
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Checks the replies, leaves out failed and malformed ones, aggregates the rest."""
        accepted: list[tuple[int, Update]] = []
        for node, msg in self._match_replies(self._grid, replies, "training"):
            if msg is None:
                continue
            try:
                update = parse_train_reply(
                    msg.content, self.global_state, every_head=self.settings.partial_labels
                )
                identity = self.identities[node]
                if update.client != identity.client or tuple(update.tasks) != identity.tasks:
                    raise MalformedReply(
                        f"client {update.client} with tasks {update.tasks}, but the node identified "
                        f"itself as {identity.client} with tasks {list(identity.tasks)}"
                    )
            except MalformedReply as e:
                self._fail(node, f"malformed training reply: {e}")
                continue
            accepted.append((node, update))

        if not accepted:
            self.history.append(self._close_round())
            self._write_history()
            raise SegVizRunError(
                f"round {server_round}: no valid training reply; failures: "
                + "; ".join(f"node {f['node_id']}: {f['reason']}" for f in self._round["failed"])
            )

        accepted.sort(key=lambda pair: pair[1].client)
        updates = [u for _, u in accepted]
        try:
            self.global_state = aggregate(
                server_round,
                self.global_state,
                updates,
                self.settings.strategy,
                self.settings.weighting,
                owner_weight=self.settings.head_owner_weight,
                server_learning_rate=self.settings.server_learning_rate,
            )
        except AggregationError as e:
            self.history.append(self._close_round())
            self._write_history()
            raise SegVizRunError(str(e)) from None

        # A node may report a NaN loss (e.g. no training step): null in the history, and
        # left out of the round's mean loss.
        losses = {u.client: _finite_or_none(u.metrics.get("loss")) for u in updates}
        finite = [v for v in losses.values() if v is not None]
        train_loss = sum(finite) / len(finite) if finite else None
        self._round["aggregated"] = [
            {"node_id": node, "client": u.client, "num_examples": u.num_examples, "loss": losses[u.client]}
            for node, u in accepted
        ]
        self._round["train_loss"] = train_loss
        log(INFO, "Round %d: aggregated %s (%s weighting)", server_round,
            ", ".join(f"{u.client} ({u.num_examples} examples)" for u in updates), self.settings.weighting)
        metrics = MetricRecord({"num-aggregated": len(updates)})
        if train_loss is not None:
            metrics["loss"] = train_loss
        return to_array_record(self.global_state), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One ``evaluate`` message per identified node: the view the next round starts from."""
        self._grid = grid
        connected = set(grid.get_node_ids())
        nodes = sorted(n for n in self.identities if n in connected)
        view = client_view(self.global_state, self.settings.strategy, server_round + 1)
        eval_config = ConfigRecord(
            {
                "server-round": server_round,
                "num-server-rounds": self.settings.num_server_rounds,
                "strategy": self.settings.strategy,
            }
        )
        self._sent = self._per_node_messages(view, eval_config, nodes, MessageType.EVALUATE, server_round)
        return self._sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Averages the evaluation metrics, then saves the history and the global model."""
        results: list[tuple[int, dict[str, float]]] = []
        for node, msg in self._match_replies(self._grid, replies, "evaluation"):
            if msg is None:
                continue
            try:
                results.append(parse_evaluate_reply(msg.content))
            except MalformedReply as e:
                self._fail(node, f"malformed evaluation reply: {e}")
        metrics = aggregate_metrics(results)
        self._round["metrics"] = metrics
        self.history.append(self._close_round())
        self._save(server_round)
        return MetricRecord(metrics) if metrics else None

    # -- helpers ------------------------------------------------------------------------------

    def _per_node_messages(
        self, view: Mapping[str, Tensor], config: ConfigRecord, nodes: list[int], kind: str, server_round: int
    ) -> list[Message]:
        """Each node gets the representation and the heads of its own tasks only (every head
        under a partial-label strategy): :func:`~segviz_flower.aggregate.node_view`."""
        messages: list[Message] = []
        for node in nodes:
            arrays = node_view(view, self.settings.strategy, self.identities[node].tasks)
            content = RecordDict({"arrays": to_array_record(arrays), "config": config})
            messages.extend(self._messages(content, [node], kind, server_round))
        return messages

    def _messages(self, content: RecordDict, nodes: list[int], kind: str, server_round: int) -> list[Message]:
        # The TTL tells the SuperLink and the node how long the instruction stays valid: a
        # reply after round-timeout would be ignored anyway.
        return [
            Message(
                content=content,
                dst_node_id=node,
                message_type=kind,
                ttl=float(self.settings.round_timeout),
                group_id=str(server_round),
            )
            for node in nodes
        ]

    def _match_replies(self, grid: Any, replies: Iterable[Message], phase: str) -> list[tuple[int, Message | None]]:
        """Pairs each sent instruction's node with its reply (``None`` when it failed; the
        reason is recorded), in the order the replies arrived."""
        outcome = getattr(grid, "last_phase", None)
        closed = outcome.closed_because if outcome else f"round-timeout ({self.settings.round_timeout:g} s)"
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
        answered: set[int] = set()
        out: list[tuple[int, Message | None]] = []
        for msg in replies:
            node = by_id.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(node)
            if msg.has_error():
                self._fail(node, f"{phase} failed: {_error_text(msg)}")
                out.append((node, None))
            elif not msg.has_content():
                self._fail(node, f"{phase} reply without content")
                out.append((node, None))
            else:
                out.append((node, msg))
        for mid, node in by_id.items():
            if node in answered:
                continue
            if outcome and node in outcome.unsent:
                self._fail(node, f"the SuperLink did not accept its {phase} instruction")
            elif outcome and mid in outcome.uploading:
                self._fail(node, f"{phase} reply still in transfer when the phase closed on {closed} (a "
                                 "node that stopped mid-upload stays so until Flower drops the upload after 180 s)")
            else:
                self._fail(node, f"no {phase} reply when the phase closed on {closed}")
        return out

    def _fail(self, node: int, reason: str, level: int = WARNING) -> None:
        identity = self.identities.get(node)
        who = f"node {node}" + (f" ({identity.client})" if identity else "")
        log(level, "Round %s: %s left out: %s", self._round.get("round"), who, reason)
        self._round["failed"].append({"node_id": node, "reason": reason})

    def _close_round(self) -> dict[str, Any]:
        entry = dict(self._round)
        entry["seconds"] = time.monotonic() - self._round_start
        return entry

    def _write_history(self) -> None:
        data = json.dumps(self.history, indent=2, allow_nan=False, default=_json_default).encode() + b"\n"
        write_atomically(self.settings.out_dir / HISTORY_FILE, data)

    def _save(self, server_round: int) -> None:
        """History first, the global model last: its round number marks a complete save."""
        self._write_history()
        path = self.settings.out_dir / GLOBAL_FILE
        write_checkpoint(
            path,
            Checkpoint(
                config=self.model_config,
                metadata={
                    **self.initial_metadata,
                    "method": self.settings.strategy,
                    "round": server_round,
                    "strategy": self.settings.strategy,
                    "engine": f"flower {flwr.__version__}",
                },
                tensors=self.global_state,
            ),
        )
        log(INFO, "Round %d: saved %s and %s", server_round, path, self.settings.out_dir / HISTORY_FILE)


def _finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"cannot write {type(value).__name__} to history.json")


# --------------------------------------------------------------------------------------------
# The ServerApp
# --------------------------------------------------------------------------------------------

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Runs the SegViz federation; see the module documentation."""
    try:
        settings = Settings.from_run_config(context.run_config)
        initial = load_initial_model(settings.initial_model)
        settings.out_dir.mkdir(parents=True, exist_ok=True)
    except (ConfigError, SegVizFormatError, OSError) as e:
        log(ERROR, "SegViz ServerApp cannot start: %s", e)
        raise SegVizRunError(f"SegViz ServerApp cannot start: {e}") from None

    log(INFO, "SegViz on Flower %s: %d rounds of %s (%s weighting), model %s",
        flwr.__version__, settings.num_server_rounds, settings.strategy, settings.weighting,
        settings.initial_model)
    wait_for_nodes(grid, settings.min_nodes, settings.node_wait_timeout)

    strategy = SegVizStrategy(settings, initial)
    bounded = BoundedGrid(grid, min_nodes=settings.min_nodes, straggler_timeout=settings.straggler_timeout)
    strategy.start(
        grid=bounded,
        initial_arrays=to_array_record(initial.tensors),
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout,
    )
    log(INFO, "SegViz federation finished: %s", settings.out_dir / GLOBAL_FILE)
