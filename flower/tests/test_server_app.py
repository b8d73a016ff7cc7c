"""The ServerApp's strategy without a SuperLink: a fake Grid answers like nodes would.

Covers the message contract of docs/flower.md (what is sent, what a reply must hold), the
handling of failed, malformed, missing and duplicate replies, and what is saved each round.
"""

import json
import logging
import math
import tempfile
import threading
import time
import unittest
from pathlib import Path

import numpy as np

import _path  # noqa: F401
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from segviz_flower.segviz_format import (
    Checkpoint,
    SegVizFormatError,
    Tensor,
    TensorClass,
    classification_to_json,
    read_checkpoint,
    write_checkpoint,
)
from segviz_flower import server_app
from segviz_flower.server_app import (
    ConfigError,
    MalformedReply,
    SegVizRunError,
    SegVizStrategy,
    Settings,
    load_initial_model,
    parse_train_reply,
    wait_for_nodes,
)

# Quiet Flower's logger: the tests provoke warnings and errors on purpose.
logging.getLogger("flwr").setLevel(logging.CRITICAL)

# Messages can only be built inside a Flower task; give this process an identity.
TaskIdentity.run_id = 1
TaskIdentity.task_id = 1
TaskIdentity.node_id = 1

REPR = TensorClass(None, False, True)
REPR_BN = TensorClass(None, True, False)
TASKS = ["liver", "spleen", "kidney"]


def initial_model() -> Checkpoint:
    rng = np.random.default_rng(0)
    tensors = {
        "representation.conv.weight": Tensor(rng.standard_normal((2, 3)).astype(np.float32), REPR),
        "representation.norm.running_mean": Tensor(np.zeros(2, np.float32), REPR_BN),
    }
    for t in TASKS:
        tensors[f"heads.{t}.conv.weight"] = Tensor(rng.standard_normal(3).astype(np.float32), TensorClass(t, False, True))
        tensors[f"heads.{t}.norm.gamma"] = Tensor(np.ones(2, np.float32), TensorClass(t, True, True))
    config = {"representation": {"in_channels": 1, "channels": [2, 4], "strides": [2], "num_res_units": 1},
              "tasks": TASKS, "head_out_channels": 2}
    return Checkpoint(config, {"seed": 0}, tensors)


class FakeNode:
    """A site: keeps its own state (representation and its heads), trains by adding a shift.

    With ``every_head`` (a node of a partial-label federation) it keeps and trains every head.
    """

    def __init__(self, node_id, client, tasks, examples, shift, behaviour="ok", every_head=False):
        self.node_id, self.client, self.tasks = node_id, client, tasks
        self.examples, self.shift, self.behaviour = examples, shift, behaviour
        init = initial_model().tensors
        self.state = {p: Tensor(t.data.copy(), t.cls) for p, t in init.items()
                      if every_head or t.cls.task in (None, *tasks)}
        self.received = []

    def reply(self, ins: Message) -> Message | None:
        self.received.append(ins)
        if ins.metadata.message_type == "query":
            return Message(RecordDict({"segviz": ConfigRecord(
                {"client": self.client, "tasks": self.tasks, "format": "segviz-state/1"})}), reply_to=ins)
        if self.behaviour == "silent":
            return None
        if self.behaviour == "dead":
            return Message(Error(5, "Error: Node Unavailable"), reply_to=ins)
        arrays = ins.content.array_records["arrays"]
        for p in arrays:
            if p in self.state:
                self.state[p] = Tensor(arrays[p].numpy(), self.state[p].cls)
        if ins.metadata.message_type == "evaluate":
            metrics = {"num-examples": 2} | {f"dice/{t}": 0.5 + self.shift / 10 for t in self.tasks}
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=ins)
        for p, t in self.state.items():
            self.state[p] = Tensor(t.data + np.float32(self.shift), t.cls)
        sent = dict(self.state)
        if self.behaviour == "nan":
            p = next(iter(sent))
            sent[p] = Tensor(np.full(sent[p].data.shape, np.nan, np.float32), sent[p].cls)
        content = RecordDict({
            "arrays": ArrayRecord({p: Array(t.data) for p, t in sent.items()}),
            "metrics": MetricRecord({"num-examples": self.examples, "steps": 3,
                                     "loss": math.nan if self.behaviour == "nan-loss" else 1.0 + self.shift}),
            "segviz": ConfigRecord({"client": self.client, "tasks": self.tasks,
                                    "classification": classification_to_json(sent), "format": "segviz-state/1"}),
        })
        return Message(content, reply_to=ins)


class FakeGrid:
    """A Grid that behaves like flwr 1.42's HttpGrid with nodes answering at once.

    A node with ``behaviour="dies-uploading"`` stops in the middle of uploading its round-2
    training reply: the reply is listed, its objects never complete, and ``pull_messages``
    waits (as HttpGrid's ``pull_objects`` does) until the SuperLink drops the upload after the
    object-push session TTL (180 s in Flower, ``ttl`` here), then returns an error reply.
    After that the node is dead. ``connected`` limits ``get_node_ids``.
    """

    def __init__(self, nodes, ttl=0.0):
        self.nodes = {n.node_id: n for n in nodes}
        self.connected = set(self.nodes)
        self.ttl = ttl
        self._replies = {}
        self._lock = threading.Lock()

    def get_node_ids(self):
        return sorted(self.connected)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as HttpGrid.push_messages does
            node = self.nodes[m.metadata.dst_node_id]
            uploading = (node.behaviour == "dies-uploading" and m.metadata.message_type == "train"
                         and m.metadata.group_id == "2")
            if node.behaviour == "dies-uploading" and m.metadata.message_type != "query" and int(m.metadata.group_id) > 2:
                reply = Message(Error(5, "Error: Node Unavailable"), reply_to=m)
            elif node.behaviour == "dies-uploading" and m.metadata.message_type == "evaluate" and m.metadata.group_id == "2":
                reply = Message(Error(5, "Error: Node Unavailable"), reply_to=m)
            else:
                reply = node.reply(m)
            with self._lock:
                self._replies[m.object_id] = (m, reply, uploading)
            ids.append(m.object_id)
        return ids

    def pull_messages(self, message_ids):
        out = []
        for mid in list(message_ids):
            with self._lock:
                entry = self._replies.get(mid)
            if entry is None or entry[1] is None:
                continue
            ins, reply, uploading = entry
            if uploading:
                time.sleep(self.ttl)
                reply = Message(Error(4, "Reply message objects are unavailable."), reply_to=ins)
            with self._lock:
                self._replies.pop(mid, None)
            out.append(reply)
        return out

    def send_and_receive(self, messages, *, timeout=None):
        """HttpGrid.send_and_receive (flwr 1.42), with a shorter pause between pulls."""
        msg_ids = set(self.push_messages(messages))
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        ret = []
        while timeout is None or time.time() < end_time:
            res_msgs = self.pull_messages(msg_ids)
            ret.extend(res_msgs)
            msg_ids.difference_update({msg.metadata.reply_to_message_id for msg in res_msgs})
            if len(msg_ids) == 0:
                break
            time.sleep(0.05)
        return ret


class Base(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.root = Path(self.dir.name)
        self.model_path = self.root / "init.segviz"
        write_checkpoint(self.model_path, initial_model())

    def tearDown(self):
        self.dir.cleanup()

    def run_config(self, **kw):
        cfg = {"num-server-rounds": 2, "local-epochs": 1, "strategy": "fedbn", "weighting": "examples",
               "proximal-mu": 0.01, "min-nodes": 2, "initial-model": str(self.model_path),
               "out-dir": str(self.root / "out"), "round-timeout": 5, "node-wait-timeout": 0}
        cfg.update(kw)
        return cfg

    def run_app(self, nodes, grid=None, **kw):
        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=self.run_config(**kw))
        server_app.main(grid or FakeGrid(nodes), context)
        out = self.root / "out"
        return json.loads((out / "history.json").read_text()), read_checkpoint(out / "global.segviz")


class WholeRun(Base):
    def test_two_rounds_with_failures(self):
        nodes = [
            FakeNode(11, "liver_site", ["liver"], 4, 1.0),
            FakeNode(12, "spleen_site", ["spleen"], 2, 2.0),
            FakeNode(13, "dead_site", ["kidney"], 1, 0.0, "dead"),
            FakeNode(14, "nan_site", ["kidney"], 1, 0.0, "nan"),
            FakeNode(15, "silent_site", ["kidney"], 1, 0.0, "silent"),
            FakeNode(16, "liver_site", ["liver"], 8, 5.0),  # same client name as node 11
        ]
        history, final = self.run_app(nodes, **{"round-timeout": 1})
        self.assertEqual([h["round"] for h in history], [1, 2])
        r1 = history[0]
        self.assertEqual([(a["client"], a["node_id"]) for a in r1["aggregated"]], [("liver_site", 11), ("spleen_site", 12)])
        reasons = {}
        for f in r1["failed"]:
            reasons.setdefault(f["node_id"], []).append(f["reason"])
        self.assertEqual(sorted(reasons), [13, 14, 15, 16])
        self.assertIn("training failed: error 5: Error: Node Unavailable", reasons[13][0])
        self.assertIn("evaluation failed: error 5", reasons[13][1])
        self.assertIn("non-finite", reasons[14][0])
        self.assertEqual(reasons[15], ["no training reply when the phase closed on round-timeout (1 s)",
                                       "no evaluation reply when the phase closed on round-timeout (1 s)"])
        # A site name already taken: refused for the run, said in every round, never trained.
        refused = "refused for this run: site name 'liver_site' is already taken by node 11"
        self.assertEqual(len(reasons[16]), 1)
        self.assertIn(refused, reasons[16][0])
        self.assertIn(refused, [f["reason"] for f in history[1]["failed"] if f["node_id"] == 16][0])
        self.assertEqual([m.metadata.message_type for m in nodes[5].received], ["query"])
        self.assertAlmostEqual(r1["train_loss"], 2.5)  # mean of 2.0 and 3.0, as the Rust server
        # Every identified node evaluates, weighted by num-examples; the refused node 16 does not.
        self.assertAlmostEqual(r1["metrics"]["dice/liver"], 0.6)
        self.assertAlmostEqual(r1["metrics"]["dice/spleen"], 0.7)
        self.assertGreaterEqual(r1["seconds"], 0.0)
        # The initial model's metadata (e.g. preprocessing for `predict`) is kept.
        self.assertEqual(
            final.metadata,
            {"seed": 0, "method": "fedbn", "round": 2, "strategy": "fedbn", "engine": "flower 1.42.0"},
        )
        self.assertEqual(final.config, initial_model().config)

        # Round 1 sent everything; round 2 (and the evaluations) no representation BatchNorm.
        first, = [m for m in nodes[0].received if m.metadata.group_id == "1" and m.metadata.message_type == "train"]
        self.assertIn("representation.norm.running_mean", first.content.array_records["arrays"])
        later = [m for m in nodes[0].received
                 if m.metadata.message_type != "query" and not (m.metadata.group_id == "1" and m.metadata.message_type == "train")]
        self.assertEqual(len(later), 3)
        for m in later:
            keys = set(m.content.array_records["arrays"])
            self.assertNotIn("representation.norm.running_mean", keys)
            self.assertIn("heads.liver.norm.gamma", keys)  # its own head travels whole, BN included
        # Each head goes to its owners only (as segviz-fed and the paper): the liver site never
        # receives the spleen or kidney heads, the spleen site never the liver head.
        for node, own in ((nodes[0], "liver"), (nodes[1], "spleen")):
            for m in node.received:
                if m.metadata.message_type == "query":
                    continue
                heads = {p.split(".")[1] for p in m.content.array_records["arrays"] if p.startswith("heads.")}
                self.assertEqual(heads, {own}, f"{m.metadata.message_type} round {m.metadata.group_id}")
        # Every node is asked who it is once, before its first instruction.
        self.assertEqual([m.metadata.message_type for m in nodes[0].received][:2], ["query", "train"])
        self.assertEqual(sum(m.metadata.message_type == "query" for m in nodes[0].received), 1)
        cfg = first.content.config_records["config"]
        self.assertEqual(dict(cfg), {"server-round": 1, "num-server-rounds": 2, "local-epochs": 1, "strategy": "fedbn"})
        self.assertEqual(first.metadata.ttl, 1.0)

        # The saved global equals the rule applied to the accepted updates (by hand here).
        g = initial_model().tensors
        # liver_site (node 11) is the only liver owner: its head moved by 1 in each round.
        liver = final.tensors["heads.liver.conv.weight"].data
        np.testing.assert_allclose(liver, g["heads.liver.conv.weight"].data + 2.0, rtol=0, atol=1e-6)
        conv = final.tensors["representation.conv.weight"].data
        # Round 1: (4*(x+1) + 2*(x+2)) / 6 = x + 4/3; round 2 again: x + 8/3.
        np.testing.assert_allclose(conv, g["representation.conv.weight"].data + 8 / 3, rtol=0, atol=1e-5)
        # Kidney: no valid update carried it; it keeps its initial value.
        np.testing.assert_array_equal(final.tensors["heads.kidney.conv.weight"].data, g["heads.kidney.conv.weight"].data)
        # FedBN: the global BN is the mean of the nodes' local BN: liver moved 1+1, spleen 2+2.
        np.testing.assert_allclose(final.tensors["representation.norm.running_mean"].data, (4 * 2 + 2 * 4) / 6)

    def test_nan_loss_is_null_in_the_history(self):
        nodes = [FakeNode(11, "a", ["liver"], 1, 0.5, "nan-loss"), FakeNode(12, "b", ["spleen"], 1, 0.25)]
        history, _ = self.run_app(nodes, **{"num-server-rounds": 1})
        self.assertEqual([(a["client"], a["loss"]) for a in history[0]["aggregated"]], [("a", None), ("b", 1.25)])
        self.assertEqual(history[0]["train_loss"], 1.25)

    def test_fedprox_sends_mu(self):
        nodes = [FakeNode(11, "a", ["liver"], 1, 0.5), FakeNode(12, "b", ["spleen"], 1, 0.5)]
        self.run_app(nodes, strategy="fedprox", **{"num-server-rounds": 1, "proximal-mu": 0.25})
        cfg = nodes[0].received[1].content.config_records["config"]  # after the query
        self.assertEqual(nodes[0].received[1].metadata.message_type, "train")
        self.assertEqual(cfg["proximal-mu"], 0.25)
        self.assertEqual(cfg["strategy"], "fedprox")
        self.assertIn("representation.norm.running_mean", nodes[0].received[-1].content.array_records["arrays"])

    def test_no_valid_reply_fails_the_run_and_keeps_the_reasons(self):
        nodes = [FakeNode(11, "a", ["liver"], 1, 0.0, "dead"), FakeNode(12, "b", ["spleen"], 1, 0.0, "nan")]
        with self.assertRaisesRegex(SegVizRunError, "round 1: no valid training reply.*node 11.*Node Unavailable"):
            self.run_app(nodes)
        history = json.loads((self.root / "out" / "history.json").read_text())
        self.assertEqual(len(history[0]["failed"]), 2)
        self.assertFalse((self.root / "out" / "global.segviz").exists())

    def test_a_taken_site_name_is_free_again_once_its_node_left(self):
        nodes = [FakeNode(11, "a", ["liver"], 1, 0.5), FakeNode(12, "b", ["spleen"], 1, 0.5),
                 FakeNode(13, "a", ["liver"], 1, 0.5)]
        grid = FakeGrid(nodes)
        grid.connected = {11, 12}
        settings = Settings.from_run_config(self.run_config())
        strategy = SegVizStrategy(settings, initial_model())
        strategy._round = {"round": 1, "failed": []}
        self.assertEqual(strategy.identify(grid, 1), [11, 12])
        grid.connected = {12, 13}  # node 11 left; a reinstalled site "a" (new key) joins
        self.assertEqual(strategy.identify(grid, 2), [12, 13])
        grid.connected = {11, 12, 13}  # the old node 11 comes back while 13 holds the name
        strategy.identities.pop(11, None)
        self.assertEqual(strategy.identify(grid, 3), [12, 13])
        self.assertIn("already taken by node 13", strategy.refused[11])

    def test_a_node_with_a_task_the_model_lacks_is_refused(self):
        nodes = [FakeNode(11, "a", ["liver"], 1, 0.5), FakeNode(12, "b", ["pancreas"], 1, 0.5)]
        history, _ = self.run_app(nodes, **{"num-server-rounds": 1, "min-nodes": 1})
        self.assertEqual([a["client"] for a in history[0]["aggregated"]], ["a"])
        self.assertIn("tasks ['pancreas'] that the initial model has no head for", history[0]["failed"][0]["reason"])

    def test_too_few_nodes(self):
        with self.assertRaisesRegex(SegVizRunError, "only 1 of the 2 nodes needed"):
            self.run_app([FakeNode(11, "a", ["liver"], 1, 0.0)])

    def test_bad_settings_are_reported(self):
        with self.assertRaisesRegex(SegVizRunError, "initial-model is required"):
            self.run_app([], **{"initial-model": ""})
        with self.assertRaisesRegex(SegVizRunError, "must be an absolute path"):
            self.run_app([], **{"out-dir": "relative/out"})
        with self.assertRaisesRegex(SegVizRunError, "unknown strategy"):
            self.run_app([], strategy="fedsgd")
        (self.root / "bad.segviz").write_bytes(b"\x10" + b"\0" * 30)
        with self.assertRaisesRegex(SegVizRunError, "bad.segviz: not a SegViz model file"):
            self.run_app([], **{"initial-model": str(self.root / "bad.segviz")})
        with self.assertRaisesRegex(SegVizRunError, "absent.segviz: initial-model does not exist"):
            self.run_app([], **{"initial-model": str(self.root / "absent.segviz")})


class PartialLabels(Base):
    """Strategies fedavg_pl and fedbn_pl: every head to every node, the PL train config."""

    def nodes(self):
        return [
            FakeNode(11, "liver_site", ["liver"], 4, 1.0, every_head=True),
            FakeNode(12, "spleen_site", ["spleen"], 2, 2.0, every_head=True),
            FakeNode(13, "kidney_site", ["kidney", "liver"], 2, 4.0, every_head=True),
        ]

    def test_fedbn_pl_sends_every_head_to_every_node_and_averages_them_over_all(self):
        nodes = self.nodes()
        history, final = self.run_app(nodes, strategy="fedbn_pl", **{
            "num-server-rounds": 3, "exclusion-weight": 0.5, "distillation-weight": 2.0,
            "distillation-start": 0.01, "distillation-temperature": 3.0})
        self.assertEqual([len(r["failed"]) for r in history], [0, 0, 0])
        self.assertEqual([[a["client"] for a in r["aggregated"]] for r in history],
                         [["kidney_site", "liver_site", "spleen_site"]] * 3)
        every = {f"heads.{t}.{p}" for t in TASKS for p in ("conv.weight", "norm.gamma")}
        for node in nodes:
            sent = [m for m in node.received if m.metadata.message_type != "query"]
            self.assertEqual(len(sent), 6)  # train and evaluate, 3 rounds
            for m in sent:
                keys = set(m.content.array_records["arrays"])
                where = f"{node.client} {m.metadata.message_type} round {m.metadata.group_id}"
                self.assertTrue(every <= keys, where)
                # FedBN's view: the representation's BatchNorm in round 1's training only.
                first_train = m.metadata.message_type == "train" and m.metadata.group_id == "1"
                self.assertEqual("representation.norm.running_mean" in keys, first_train, where)
        # The train config: the plain keys, then the partial-label ones with the ramp
        # w · (s + (1 − s)(r − 1)/(R − 1)): 2·0.01, 2·0.505, 2.
        trains = [m for m in nodes[0].received if m.metadata.message_type == "train"]
        configs = [dict(m.content.config_records["config"]) for m in trains]
        self.assertEqual(configs[0], {
            "server-round": 1, "num-server-rounds": 3, "local-epochs": 1, "strategy": "fedbn_pl",
            "partial-labels": 1, "exclusion-weight": 0.5, "distillation-weight": 0.02,
            "distillation-temperature": 3.0, "distillation-threshold": 0.5})
        self.assertEqual([c["distillation-weight"] for c in configs], [0.02, 2.0 * 0.505, 2.0])
        self.assertTrue(all(isinstance(c["partial-labels"], int) for c in configs))
        evaluation = next(m for m in nodes[0].received if m.metadata.message_type == "evaluate")
        self.assertNotIn("partial-labels", evaluation.content.config_records["config"])
        # Every head comes from its owners (the default head-owner-weight, 1). Liver: owners
        # (4·1 + 2·4) / 6 = 2 per round; spleen: owner 2; kidney: owner 4 (the others' mean,
        # (4·1 + 2·2) / 6, is left out).
        g = initial_model().tensors
        per_round = {"liver": 2.0, "spleen": 2.0, "kidney": 4.0}
        for t in TASKS:
            np.testing.assert_allclose(final.tensors[f"heads.{t}.conv.weight"].data,
                                       g[f"heads.{t}.conv.weight"].data + 3 * per_round[t], rtol=0, atol=1e-5)
        self.assertEqual(final.metadata["strategy"], "fedbn_pl")

    def test_head_owner_weight_plain_averages_each_head_over_every_reply(self):
        nodes = self.nodes()
        _, final = self.run_app(nodes, strategy="fedbn_pl", **{
            "num-server-rounds": 2, "head-owner-weight": "plain"})
        # The kidney head, owned by one site only, moves by the examples-weighted shift
        # (4·1 + 2·2 + 2·4) / 8 = 2 per round, as every other head.
        g = initial_model().tensors
        for t in TASKS:
            np.testing.assert_allclose(final.tensors[f"heads.{t}.conv.weight"].data,
                                       g[f"heads.{t}.conv.weight"].data + 4.0, rtol=0, atol=1e-5)

    def test_fedavg_pl_sends_the_representation_batchnorm_every_round(self):
        nodes = self.nodes()
        self.run_app(nodes, strategy="fedavg_pl", **{"num-server-rounds": 2, "distillation-start": 0.01})
        for m in nodes[1].received[1:]:
            keys = set(m.content.array_records["arrays"])
            self.assertIn("representation.norm.running_mean", keys)
            self.assertIn("heads.kidney.conv.weight", keys)
        trains = [m for m in nodes[1].received if m.metadata.message_type == "train"]
        self.assertEqual([m.content.config_records["config"]["distillation-weight"] for m in trains], [0.01, 1.0])
        self.assertEqual(trains[0].content.config_records["config"]["exclusion-weight"], 0.15)
        self.assertEqual(trains[0].content.config_records["config"]["distillation-temperature"], 2.0)

    def test_plain_strategies_still_refuse_foreign_heads(self):
        nodes = [FakeNode(11, "a", ["liver"], 1, 0.5, every_head=True), FakeNode(12, "b", ["spleen"], 1, 0.5)]
        history, _ = self.run_app(nodes, **{"num-server-rounds": 1, "min-nodes": 1})
        self.assertEqual([a["client"] for a in history[0]["aggregated"]], ["b"])
        self.assertIn("not one of its tasks", history[0]["failed"][0]["reason"])
        # No partial-label key travels with a plain strategy.
        cfg = nodes[1].received[1].content.config_records["config"]
        self.assertFalse({"partial-labels", "exclusion-weight", "distillation-weight",
                          "distillation-temperature"} & set(cfg))

    def test_bad_partial_label_settings_are_refused(self):
        s = Settings.from_run_config(self.run_config(strategy="fedbn_pl"))
        self.assertTrue(s.partial_labels)
        self.assertEqual((s.exclusion_weight, s.distillation_weight, s.distillation_start, s.distillation_temperature),
                         (0.15, 1.0, 1.0, 2.0))
        self.assertFalse(Settings.from_run_config(self.run_config()).partial_labels)
        for key, bad, words in (
            ("exclusion-weight", -0.5, "exclusion-weight must be at least 0"),
            ("distillation-weight", -1, "distillation-weight must be at least 0"),
            ("distillation-weight", math.inf, "distillation-weight must be at least 0"),
            ("distillation-start", 1.5, "distillation-start must be at most 1"),
            ("distillation-start", -0.1, "distillation-start must be at least 0"),
            ("distillation-temperature", 0, "distillation-temperature must be greater than 0"),
            ("distillation-temperature", -2.0, "distillation-temperature must be greater than 0"),
            ("exclusion-weight", "high", "exclusion-weight must be a number"),
            ("head-owner-weight", 1.5, "head-owner-weight must be at most 1"),
            ("head-owner-weight", -0.1, "head-owner-weight must be at least 0"),
            ("head-owner-weight", "owners", "head-owner-weight must be a number"),
            ("distillation-threshold", 1.0, "distillation-threshold must be at most"),
            ("distillation-threshold", -0.5, "distillation-threshold must be at least 0"),
            ("server-learning-rate", 0.0, "server-learning-rate must be greater than 0"),
            ("server-learning-rate", math.nan, "server-learning-rate must be greater than 0"),
        ):
            with self.subTest(key=key, value=bad):
                with self.assertRaisesRegex(ConfigError, words):
                    Settings.from_run_config(self.run_config(strategy="fedbn_pl", **{key: bad}))
        # Zero weights turn a term off; a start of 1 means no ramp.
        s = Settings.from_run_config(self.run_config(strategy="fedavg_pl", **{
            "exclusion-weight": 0, "distillation-weight": 0.0, "distillation-start": 1}))
        self.assertEqual((s.exclusion_weight, s.distillation_weight, s.distillation_start), (0.0, 0.0, 1.0))
        self.assertEqual(s.server_learning_rate, 1.0)
        self.assertEqual(Settings.from_run_config(self.run_config(**{"server-learning-rate": 3})).server_learning_rate, 3.0)
        # Through the ServerApp: the run fails before any node is asked anything.
        with self.assertRaisesRegex(SegVizRunError, "cannot start: run config distillation-temperature must be greater"):
            self.run_app([], strategy="fedbn_pl", **{"distillation-temperature": 0.0})
        with self.assertRaisesRegex(SegVizRunError, "unknown strategy 'fedbn_pl_pl'"):
            self.run_app([], strategy="fedbn_pl_pl")


class Stragglers(Base):
    """Row 17 of issue 10: nodes killed while uploading their round-2 reply."""

    def nodes(self):
        nodes = [FakeNode(10 + i, f"site{i}", [TASKS[i % 3]], 1, 0.1 * i) for i in range(6)]
        for n in nodes[4:]:
            n.behaviour = "dies-uploading"
        return nodes

    def test_the_round_closes_once_min_nodes_replied_and_the_straggler_deadline_passed(self):
        nodes = self.nodes()
        start = time.monotonic()
        # Flower's 180 s upload TTL scaled down to 8 s; round-timeout far above it.
        history, _ = self.run_app(nodes, grid=FakeGrid(nodes, ttl=8.0), **{
            "min-nodes": 4, "round-timeout": 60, "straggler-timeout": 0.5})
        elapsed = time.monotonic() - start
        self.assertEqual([len(r["aggregated"]) for r in history], [6, 4])
        self.assertLess(history[1]["seconds"], 4.0, "round 2 waited for the dead uploads")
        self.assertLess(elapsed, 7.0)
        reasons = [f["reason"] for f in history[1]["failed"] if f["node_id"] in (14, 15)]
        self.assertEqual(len(reasons), 4, reasons)  # training (stuck upload) and evaluation (dead)
        self.assertIn("training reply still in transfer when the phase closed on straggler-timeout (0.5 s", reasons[0])

    def test_round_timeout_bounds_a_stuck_upload(self):
        nodes = self.nodes()
        history, _ = self.run_app(nodes, grid=FakeGrid(nodes, ttl=8.0), **{
            "min-nodes": 4, "round-timeout": 2})
        self.assertEqual([len(r["aggregated"]) for r in history], [6, 4])
        self.assertLess(history[1]["seconds"], 5.0, "round-timeout did not bound the stuck upload")
        self.assertIn("closed on round-timeout (2 s)", history[1]["failed"][0]["reason"])


class Replies(Base):
    def good_content(self, **override):
        node = FakeNode(11, "a", ["liver"], 3, 1.0)
        ins = Message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord()}), dst_node_id=11, message_type="train")
        ins.metadata.__dict__["_message_id"] = ins.object_id
        content = node.reply(ins).content
        return content, node

    def test_good_reply(self):
        content, node = self.good_content()
        u = parse_train_reply(content, initial_model().tensors)
        self.assertEqual((u.client, u.tasks, u.num_examples), ("a", ["liver"], 3))
        self.assertEqual(set(u.tensors), set(node.state))
        self.assertEqual(u.metrics["loss"], 2.0)

    def assert_malformed(self, content, words):
        with self.assertRaises(MalformedReply) as ctx:
            parse_train_reply(content, initial_model().tensors)
        self.assertIn(words, str(ctx.exception))

    def test_missing_records(self):
        for name in ("arrays", "metrics", "segviz"):
            content, _ = self.good_content()
            del content[name]
            self.assert_malformed(content, f"no {name} record")

    def test_classification_must_match_arrays_and_global(self):
        content, node = self.good_content()
        seg = content.config_records["segviz"]
        cls = json.loads(seg["classification"])
        del cls["representation.conv.weight"]
        seg["classification"] = json.dumps(cls)
        self.assert_malformed(content, "sent but not classified: ['representation.conv.weight']")

        content, node = self.good_content()
        seg = content.config_records["segviz"]
        cls = json.loads(seg["classification"])
        cls["representation.conv.weight"]["batch_norm"] = True
        seg["classification"] = json.dumps(cls)
        self.assert_malformed(content, "the global model says")

        content, node = self.good_content()
        content.config_records["segviz"]["tasks"] = ["spleen"]
        self.assert_malformed(content, "not one of its tasks")
        # Under a partial-label strategy every node trains and returns every head.
        u = parse_train_reply(content, initial_model().tensors, every_head=True)
        self.assertEqual((u.client, u.tasks), ("a", ["spleen"]))
        self.assertIn("heads.liver.conv.weight", u.tensors)

        content, node = self.good_content()
        content.config_records["segviz"]["format"] = "segviz-state/2"
        self.assert_malformed(content, "segviz format")

    def test_arrays_must_be_float32_of_the_global_shape(self):
        content, node = self.good_content()
        content.array_records["arrays"]["representation.conv.weight"] = Array(np.zeros((3, 2), np.float32))
        self.assert_malformed(content, "has shape [3, 2], the global model [2, 3]")
        content, node = self.good_content()
        content.array_records["arrays"]["representation.conv.weight"] = Array(np.zeros((2, 3), np.float64))
        self.assert_malformed(content, "dtype float64")

    def test_num_examples_required(self):
        content, node = self.good_content()
        del content.metric_records["metrics"]["num-examples"]
        self.assert_malformed(content, "metrics has no num-examples")
        content, node = self.good_content()
        content.metric_records["metrics"]["num-examples"] = 2.5
        self.assert_malformed(content, "non-negative integer")


class Helpers(Base):
    def test_settings_defaults_and_checks(self):
        s = Settings.from_run_config(self.run_config())
        self.assertEqual((s.strategy, s.weighting, s.min_nodes, s.round_timeout), ("fedbn", "examples", 2, 5.0))
        self.assertEqual(s.straggler_timeout, 0.0)  # off unless asked for
        with self.assertRaisesRegex(ConfigError, "straggler-timeout must be at least 0"):
            Settings.from_run_config(self.run_config(**{"straggler-timeout": -1}))
        with self.assertRaisesRegex(ConfigError, "min-nodes must be at least 1"):
            Settings.from_run_config(self.run_config(**{"min-nodes": 0}))
        with self.assertRaisesRegex(ConfigError, "num-server-rounds must be an integer"):
            Settings.from_run_config(self.run_config(**{"num-server-rounds": 1.5}))
        with self.assertRaisesRegex(ConfigError, "unknown weighting"):
            Settings.from_run_config(self.run_config(weighting="by-size"))

    def test_load_initial_model_checks_values(self):
        c = initial_model()
        c.tensors["representation.conv.weight"].data[0, 0] = np.nan
        write_checkpoint(self.model_path, c)
        with self.assertRaisesRegex(SegVizFormatError, "non-finite"):
            load_initial_model(self.model_path)

    def test_wait_for_nodes(self):
        grid = FakeGrid([FakeNode(11, "a", ["liver"], 1, 0.0)])
        self.assertEqual(wait_for_nodes(grid, 1, 0), [11])
        with self.assertRaisesRegex(SegVizRunError, "node-wait-timeout = 0 s"):
            wait_for_nodes(grid, 2, 0)


if __name__ == "__main__":
    unittest.main()
