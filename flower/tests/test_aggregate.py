"""The SegViz aggregation rule on hand-checked tiny states (mirrors segviz-fed's strategy tests)."""

import unittest

import numpy as np

import _path  # noqa: F401
from segviz_flower.aggregate import (
    AggregationError,
    Update,
    aggregate,
    aggregate_metrics,
    base_strategy,
    check_strategy,
    client_view,
    distillation_weight_at,
    is_partial_label,
    node_view,
)
from segviz_flower.segviz_format import Tensor, TensorClass

CONV = "representation.down.0.units.0.conv.weight"
BN = "representation.down.0.units.0.adn.norm.gamma"


def head(task: str) -> str:
    return f"heads.{task}.block.upsample.weight"


def head_bn(task: str) -> str:
    return f"heads.{task}.block.upsample_adn.norm.gamma"


def state(conv: float, bn: float, heads: dict) -> dict:
    """One conv weight (2 values), one BatchNorm weight and a weight (+ BN weight) per head."""
    s = {
        CONV: Tensor(np.array([conv, conv * 2], np.float32), TensorClass(None, False, True)),
        BN: Tensor(np.array([bn], np.float32), TensorClass(None, True, True)),
    }
    for task, v in heads.items():
        s[head(task)] = Tensor(np.array([v], np.float32), TensorClass(task, False, True))
        s[head_bn(task)] = Tensor(np.array([v + 100], np.float32), TensorClass(task, True, True))
    return s


def update(client: str, n: int, s: dict) -> Update:
    tasks = sorted({t.cls.task for t in s.values() if t.cls.task})
    return Update(client=client, tasks=tasks, num_examples=n, tensors=s)


def value(s: dict, path: str) -> list:
    return s[path].data.tolist()


class FedAvgRule(unittest.TestCase):
    def test_weights_by_examples_or_uniformly(self):
        g = state(0, 0, {"liver": 0, "spleen": 0})
        ups = [update("a", 1, state(1, 10, {"liver": 5})), update("b", 3, state(5, 20, {"spleen": 7}))]
        by_examples = aggregate(1, g, ups, "fedavg", "examples")
        # (1*1 + 3*5) / 4 = 4, and the second value doubles.
        self.assertEqual(value(by_examples, CONV), [4.0, 8.0])
        self.assertEqual(value(by_examples, BN), [17.5])
        uniform = aggregate(1, g, ups, "fedavg", "uniform")
        self.assertEqual(value(uniform, CONV), [3.0, 6.0])
        self.assertEqual(value(uniform, BN), [15.0])
        for s in (by_examples, uniform):
            self.assertTrue(all(t.data.dtype == np.float32 for t in s.values()))
        # The input global state is not modified.
        self.assertEqual(value(g, CONV), [0.0, 0.0])

    def test_heads_come_from_their_owners_only(self):
        g = state(0, 0, {"liver": 0.5, "spleen": 0.5, "kidney": 9})
        ups = [
            update("liver_site", 1, state(1, 1, {"liver": 2})),
            update("spleen_site", 1, state(1, 1, {"spleen": 3})),
            update("liver_too", 3, state(1, 1, {"liver": 6})),
        ]
        for strategy in ("fedavg", "fedbn", "fedprox"):
            nxt = aggregate(1, g, ups, strategy, "examples")
            # Liver: averaged over its two owners by examples: (2 + 18) / 4 = 5.
            self.assertEqual(value(nxt, head("liver")), [5.0])
            self.assertEqual(value(nxt, head_bn("liver")), [105.0])
            self.assertEqual(value(nxt, head("spleen")), [3.0])
            # Nobody trained the kidney head: it keeps its global value.
            self.assertEqual(value(nxt, head("kidney")), [9.0])
            self.assertEqual(value(nxt, head_bn("kidney")), [109.0])
            self.assertEqual(nxt[head("liver")].cls, TensorClass("liver", False, True))

    def test_zero_weight_update_is_dropped(self):
        g = state(0, 0, {"liver": 0, "spleen": 0.25})
        ups = [update("a", 2, state(1, 1, {"liver": 1})), update("b", 0, state(100, 100, {"spleen": 100}))]
        nxt = aggregate(1, g, ups, "fedavg", "examples")
        self.assertEqual(value(nxt, CONV), [1.0, 2.0])
        # b's spleen head carries no weight: the global value stays.
        self.assertEqual(value(nxt, head("spleen")), [0.25])
        # Uniform weighting ignores num_examples (as the Rust Weighting::Uniform does).
        uni = aggregate(1, g, ups, "fedavg", "uniform")
        self.assertEqual(value(uni, CONV), [50.5, 101.0])
        # Only zero-weight updates: nothing changes.
        same = aggregate(1, g, [ups[1]], "fedavg", "examples")
        for p in g:
            self.assertEqual(value(same, p), value(g, p))

    def test_accumulates_in_float64_and_rounds_once(self):
        # The result is the float64 weighted mean rounded once to float32.
        x = np.float32(1.0) + np.float32(2.0**-23)
        g = {CONV: Tensor(np.zeros(1, np.float32), TensorClass(None, False, True))}
        ups = [
            Update(c, [], 1, {CONV: Tensor(np.array([v], np.float32), TensorClass(None, False, True))})
            for c, v in (("a", x), ("b", x), ("c", 1.0))
        ]
        got = aggregate(1, g, ups, "fedavg", "examples")[CONV].data[0]
        expect = np.float32((np.float64(x) * 2 + 1.0) / 3.0)
        self.assertEqual(got, expect)

    def test_order_of_updates_is_the_sum_order(self):
        vals = [np.float32(v) for v in (1e8, 1.0, -1e8, 3.0)]
        g = {CONV: Tensor(np.zeros(1, np.float32), TensorClass(None, False, True))}
        ups = [
            Update(str(i), [], 1, {CONV: Tensor(np.array([v], np.float32), TensorClass(None, False, True))})
            for i, v in enumerate(vals)
        ]
        acc = 0.0
        for v in vals:
            acc += 1.0 * float(v)
        self.assertEqual(aggregate(1, g, ups, "fedavg", "examples")[CONV].data[0], np.float32(acc / 4.0))

    def test_no_update_is_an_error(self):
        with self.assertRaisesRegex(AggregationError, "round 3: no client finished the round"):
            aggregate(3, state(0, 0, {}), [], "fedprox", "examples")

    def test_unknown_strategy_or_weighting(self):
        with self.assertRaisesRegex(ValueError, "unknown strategy"):
            aggregate(1, state(0, 0, {}), [update("a", 1, state(1, 1, {}))], "fedsomething", "examples")
        with self.assertRaisesRegex(ValueError, "unknown weighting"):
            aggregate(1, state(0, 0, {}), [update("a", 1, state(1, 1, {}))], "fedavg", "some")

    def test_mismatched_shapes_are_refused(self):
        g = state(0, 0, {})
        bad = state(1, 1, {})
        bad[CONV] = Tensor(np.array([[1, 2]], np.float32), bad[CONV].cls)
        bad2 = state(1, 1, {})
        bad2[CONV] = Tensor(np.array([1, 2, 3], np.float32), bad2[CONV].cls)
        with self.assertRaises(AggregationError) as ctx:
            aggregate(4, g, [update("a", 1, bad), update("b", 1, bad2)], "fedavg", "examples")
        msg = str(ctx.exception)
        self.assertIn("round 4", msg)
        self.assertIn("client b", msg)
        self.assertIn(CONV, msg)
        # Against the global model's shape as well.
        with self.assertRaisesRegex(AggregationError, f"client a sent {CONV} with shape \\[1, 2\\], the global"):
            aggregate(4, g, [update("a", 1, bad)], "fedavg", "examples")


class ClientView(unittest.TestCase):
    def test_fedbn_sends_batchnorm_in_round_one_only(self):
        g = state(0, 0, {"liver": 0, "spleen": 0})
        self.assertIn(BN, client_view(g, "fedbn", 1))
        for r in (2, 3, 10):
            view = client_view(g, "fedbn", r)
            self.assertFalse(any(t.cls.batch_norm and t.cls.is_representation for t in view.values()))
            self.assertIn(CONV, view)
            # Heads travel whole (their own BatchNorm included), all of them.
            self.assertIn(head("spleen"), view)
            self.assertIn(head_bn("liver"), view)

    def test_fedavg_and_fedprox_send_everything(self):
        g = state(0, 0, {"liver": 0})
        for strategy in ("fedavg", "fedprox"):
            for r in (1, 2):
                self.assertEqual(set(client_view(g, strategy, r)), set(g))

    def test_after_a_round_every_node_gets_the_global_non_batchnorm_tensors(self):
        g = state(0, 0, {"liver": 0, "spleen": 0})
        ups = [update("a", 2, state(1, 10, {"liver": 1})), update("b", 1, state(4, 40, {"spleen": 3}))]
        for strategy in ("fedavg", "fedbn", "fedprox"):
            nxt = aggregate(1, g, ups, strategy, "examples")
            for path, t in client_view(nxt, strategy, 2).items():
                np.testing.assert_array_equal(t.data, nxt[path].data)
        # Under FedBN the global still holds the BatchNorm mean (never sent): (2*10 + 40) / 3.
        self.assertEqual(value(aggregate(1, g, ups, "fedbn", "examples"), BN), [np.float32(20.0)])


class PartialLabelRule(unittest.TestCase):
    """fedavg_pl and fedbn_pl: every head to every node, the wrapped strategy's aggregation."""

    def test_names(self):
        for strategy, base in (("fedavg_pl", "fedavg"), ("fedbn_pl", "fedbn")):
            self.assertEqual(check_strategy(strategy), strategy)
            self.assertTrue(is_partial_label(strategy))
            self.assertEqual(base_strategy(strategy), base)
        for strategy in ("fedavg", "fedbn", "fedprox"):
            self.assertFalse(is_partial_label(strategy))
            self.assertEqual(base_strategy(strategy), strategy)
        for bad in ("fedbn_pl_pl", "fedsgd_pl", "_pl"):
            with self.assertRaisesRegex(ValueError, f"unknown strategy {bad!r}: expected one of .*fedbn_pl"):
                check_strategy(bad)

    def test_the_distillation_weight_ramps_linearly(self):
        # As PartialLabelConfig::distillation_weight_at's test: 0.01 in round 1, 1 in the last.
        self.assertEqual(distillation_weight_at(1, 11, 1.0, 0.01), 0.01)
        self.assertAlmostEqual(distillation_weight_at(6, 11, 1.0, 0.01), 0.505, places=12)
        self.assertEqual(distillation_weight_at(11, 11, 1.0, 0.01), 1.0)
        self.assertEqual(distillation_weight_at(1, 1, 1.0, 0.01), 1.0)
        # The midpoint of an odd ramp, and the weight scaling every value.
        self.assertAlmostEqual(distillation_weight_at(2, 3, 1.0, 0.01), 0.505, places=12)
        self.assertEqual(distillation_weight_at(1, 3, 4.0, 0.25), 1.0)
        self.assertEqual(distillation_weight_at(3, 3, 4.0, 0.25), 4.0)
        # Monotonic, and clamped outside 1..rounds.
        ramp = [distillation_weight_at(r, 5, 1.0, 0.01) for r in range(1, 6)]
        self.assertEqual(ramp, sorted(ramp))
        self.assertEqual(distillation_weight_at(9, 5, 1.0, 0.01), 1.0)
        self.assertEqual(distillation_weight_at(0, 5, 1.0, 0.01), 0.01)
        # A weight of 0 turns distillation off in every round.
        self.assertEqual({distillation_weight_at(r, 4, 0.0, 0.01) for r in range(1, 5)}, {0.0})

    def test_every_head_goes_to_every_node_under_pl_only(self):
        g = state(0, 0, {"liver": 0, "spleen": 0, "kidney": 0})
        heads = {p for p, t in g.items() if t.cls.is_head}
        for r in (1, 2):
            for strategy, own_only in (("fedbn", True), ("fedavg", True), ("fedprox", True),
                                       ("fedbn_pl", False), ("fedavg_pl", False)):
                view = node_view(client_view(g, strategy, r), strategy, ["liver"])
                got = {p for p in view if view[p].cls.is_head}
                want = {head("liver"), head_bn("liver")} if own_only else heads
                self.assertEqual(got, want, f"{strategy} round {r}")
                self.assertIn(CONV, view)

    def test_fedbn_pl_still_withholds_the_representation_batchnorm_after_round_one(self):
        g = state(0, 0, {"liver": 0, "spleen": 0})
        self.assertIn(BN, node_view(client_view(g, "fedbn_pl", 1), "fedbn_pl", ["spleen"]))
        for r in (2, 3, 10):
            view = node_view(client_view(g, "fedbn_pl", r), "fedbn_pl", ["spleen"])
            self.assertFalse(any(t.cls.batch_norm and t.cls.is_representation for t in view.values()))
            self.assertEqual(set(view), set(g) - {BN})
            # Heads travel whole, their own BatchNorm included, every one of them.
            self.assertIn(head_bn("liver"), view)
        # fedavg_pl sends everything, every round.
        for r in (1, 2):
            self.assertEqual(set(node_view(client_view(g, "fedavg_pl", r), "fedavg_pl", ["liver"])), set(g))

    def test_heads_are_averaged_over_every_reply(self):
        g = state(0, 0, {"liver": 0.5, "spleen": 0.5, "kidney": 9})
        every = {"liver": 0, "spleen": 0, "kidney": 0}
        ups = []
        for client, n, v in (("liver_site", 1, 2.0), ("spleen_site", 1, 3.0), ("liver_too", 2, 6.0)):
            ups.append(Update(client, ["spleen" if client == "spleen_site" else "liver"], n,
                              state(v, v, {t: v for t in every})))
        for strategy, base in (("fedavg_pl", "fedavg"), ("fedbn_pl", "fedbn")):
            nxt = aggregate(1, g, ups, strategy, "examples")
            # (1·2 + 1·3 + 2·6) / 4 = 4.25 for every head, owned or not (kidney: nobody's).
            for t in every:
                self.assertEqual(value(nxt, head(t)), [4.25], f"{strategy} {t}")
                self.assertEqual(value(nxt, head_bn(t)), [104.25], f"{strategy} {t}")
            self.assertEqual(value(nxt, CONV), [4.25, 8.5])
            # The wrapped strategy's aggregation, bit for bit.
            plain = aggregate(1, g, ups, base, "examples")
            self.assertEqual(set(nxt), set(plain))
            for p in plain:
                np.testing.assert_array_equal(nxt[p].data, plain[p].data)
                self.assertEqual(nxt[p].cls, plain[p].cls)
            uniform = aggregate(1, g, ups, strategy, "uniform")
            self.assertEqual(value(uniform, head("kidney")), [np.float32((2.0 + 3.0 + 6.0) / 3.0)])

    def test_an_owner_weight_takes_that_share_of_each_head_from_its_owners(self):
        g = state(0, 0, {"liver": 0.5, "spleen": 0.5, "kidney": 9})
        every = {"liver": 0, "spleen": 0, "kidney": 0}
        ups = []
        for client, n, v in (("liver_site", 1, 2.0), ("spleen_site", 1, 3.0), ("liver_too", 2, 6.0)):
            ups.append(Update(client, ["spleen" if client == "spleen_site" else "liver"], n,
                              state(v, v, {t: v for t in every})))
        nxt = aggregate(1, g, ups, "fedbn_pl", "examples", owner_weight=0.75)
        # liver: owners (1·2 + 2·6)/3 = 14/3, other 3 → 0.75·14/3 + 0.25·3 = 4.25 (as plain).
        self.assertAlmostEqual(float(value(nxt, head("liver"))[0]), 0.75 * 14 / 3 + 0.25 * 3, places=5)
        # spleen: owner 3, others 14/3 → 0.75·3 + 0.25·14/3.
        self.assertAlmostEqual(float(value(nxt, head("spleen"))[0]), 0.75 * 3 + 0.25 * 14 / 3, places=5)
        self.assertAlmostEqual(float(value(nxt, head_bn("spleen"))[0]), 0.75 * 103 + 0.25 * (100 + 14 / 3), places=4)
        # kidney: nobody owns it, so the plain mean.
        self.assertEqual(value(nxt, head("kidney")), [4.25])
        # The representation is untouched by the owner weight.
        self.assertEqual(value(nxt, CONV), [4.25, 8.5])
        # 1: the owners' mean only; 0: the others' only.
        self.assertEqual(value(aggregate(1, g, ups, "fedbn_pl", "examples", owner_weight=1.0), head("spleen")), [3.0])
        self.assertAlmostEqual(
            float(value(aggregate(1, g, ups, "fedbn_pl", "examples", owner_weight=0.0), head("spleen"))[0]),
            14 / 3, places=5)
        # Without the partial-label rule it changes nothing.
        plain = aggregate(1, g, ups[:1], "fedbn", "examples", owner_weight=0.75)
        self.assertEqual(value(plain, head("liver")), [2.0])


class ServerLearningRate(unittest.TestCase):
    def test_scales_the_representation_step_only(self):
        g = state(1, 2, {"liver": 3, "spleen": 4})
        ups = [update("a", 1, state(2, 10, {"liver": 5})), update("b", 1, state(4, 20, {"spleen": 7}))]
        plain = aggregate(1, g, ups, "fedavg", "uniform")
        stepped = aggregate(1, g, ups, "fedavg", "uniform", server_learning_rate=3.0)
        # The mean conv is (3, 6) from (1, 2); three times that step is (7, 14).
        self.assertEqual(value(plain, CONV), [3.0, 6.0])
        self.assertEqual(value(stepped, CONV), [7.0, 14.0])
        for path in (BN, head("liver"), head("spleen"), head_bn("liver")):
            self.assertEqual(value(stepped, path), value(plain, path), path)

    def test_steps_in_float64_from_the_float32_mean(self):
        g = state(0.1, 0, {})
        ups = [update("a", 1, state(0.2, 0, {})), update("b", 1, state(0.7, 0, {}))]
        mean = np.float32((np.float64(np.float32(0.2)) + np.float64(np.float32(0.7))) / 2)
        g0 = np.float64(np.float32(0.1))
        expected = np.float32(g0 + 2.5 * (np.float64(mean) - g0))
        out = aggregate(1, g, ups, "fedbn", "uniform", server_learning_rate=2.5)
        self.assertEqual(out[CONV].data[0], expected)

    def test_a_rate_that_is_not_positive_is_refused(self):
        g = state(0, 0, {})
        ups = [update("a", 1, state(1, 0, {}))]
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with self.assertRaises(ValueError):
                aggregate(1, g, ups, "fedavg", "uniform", server_learning_rate=bad)


class Metrics(unittest.TestCase):
    def test_weighted_by_examples(self):
        m = aggregate_metrics([(1, {"dice/liver": 0.5}), (3, {"dice/liver": 0.9, "dice/spleen": 0.7})])
        self.assertAlmostEqual(m["dice/liver"], 0.8, places=12)
        self.assertAlmostEqual(m["dice/spleen"], 0.7, places=12)

    def test_zero_examples_count_once_and_nan_is_ignored(self):
        m = aggregate_metrics([(0, {"loss": 1.0}), (1, {"loss": 3.0, "x": float("nan")})])
        self.assertEqual(m, {"loss": 2.0})


if __name__ == "__main__":
    unittest.main()
