"""flower/tools/aggregate_updates.py, run as the Rust comparison test runs it."""

import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np

import _path  # noqa: F401
from _path import FLOWER_DIR
from segviz_flower.aggregate import Update, aggregate
from segviz_flower.segviz_format import Checkpoint, Tensor, TensorClass, read_checkpoint, write_checkpoint

TOOL = FLOWER_DIR / "tools" / "aggregate_updates.py"
CONFIG = {"representation": {"in_channels": 1, "channels": [2, 4], "strides": [2], "num_res_units": 1},
          "tasks": ["liver", "spleen"], "head_out_channels": 2}


def tensors(rng, tasks):
    out = {
        "representation.conv.weight": Tensor(rng.standard_normal((3, 4)).astype(np.float32), TensorClass(None, False, True)),
        "representation.norm.running_var": Tensor(rng.random(4).astype(np.float32), TensorClass(None, True, False)),
    }
    for t in tasks:
        out[f"heads.{t}.conv.weight"] = Tensor(rng.standard_normal(5).astype(np.float32), TensorClass(t, False, True))
    return out


class Tool(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.root = Path(self.dir.name)
        rng = np.random.default_rng(1)
        self.global_tensors = tensors(rng, ["liver", "spleen"])
        write_checkpoint(self.root / "g.segviz", Checkpoint(CONFIG, {"round": 1}, self.global_tensors))
        self.updates = []
        for name, tasks, n in (("b_site", ["spleen"], 3), ("a_site", ["liver"], 5), ("c_site", ["liver"], 0)):
            u = Update(name, tasks, n, tensors(rng, tasks))
            write_checkpoint(self.root / f"{name}.segviz",
                             Checkpoint(CONFIG, {"client": name, "tasks": tasks, "num_examples": n}, u.tensors))
            self.updates.append(u)

    def tearDown(self):
        self.dir.cleanup()

    def run_tool(self, *args):
        return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True)

    def test_matches_the_library_in_the_given_order(self):
        for strategy in ("fedavg", "fedbn", "fedprox"):
            for weighting in ("examples", "uniform"):
                out = self.root / f"out-{strategy}-{weighting}.segviz"
                r = self.run_tool("--global", str(self.root / "g.segviz"), "--updates",
                                  *(str(self.root / f"{u.client}.segviz") for u in self.updates),
                                  "--strategy", strategy, "--weighting", weighting, "--round", "2", "--out", str(out))
                self.assertEqual(r.returncode, 0, r.stderr)
                got = read_checkpoint(out)
                want = aggregate(2, self.global_tensors, self.updates, strategy, weighting)
                self.assertEqual(got.config, CONFIG)
                self.assertEqual(got.metadata, {"round": 2, "strategy": strategy, "weighting": weighting})
                self.assertEqual(set(got.tensors), set(want))
                for p, t in want.items():
                    np.testing.assert_array_equal(got.tensors[p].data, t.data)
                    self.assertEqual(got.tensors[p].cls, t.cls)

    def test_partial_label_strategies_aggregate_as_the_strategy_they_wrap(self):
        # Under the partial-label rule every update carries every head; its metadata still
        # names the client's own tasks.
        rng = np.random.default_rng(2)
        files, updates = [], []
        for name, tasks, n in (("b_site", ["spleen"], 3), ("a_site", ["liver"], 5), ("c_site", ["liver"], 0)):
            u = Update(name, tasks, n, tensors(rng, ["liver", "spleen"]))
            path = self.root / f"pl-{name}.segviz"
            write_checkpoint(path, Checkpoint(CONFIG, {"client": name, "tasks": tasks, "num_examples": n}, u.tensors))
            files.append(str(path))
            updates.append(u)
        for strategy, base in (("fedavg_pl", "fedavg"), ("fedbn_pl", "fedbn")):
            for weighting in ("examples", "uniform"):
                out = self.root / f"out-{strategy}-{weighting}.segviz"
                r = self.run_tool("--global", str(self.root / "g.segviz"), "--updates", *files,
                                  "--strategy", strategy, "--weighting", weighting, "--round", "3", "--out", str(out))
                self.assertEqual(r.returncode, 0, r.stderr)
                got = read_checkpoint(out)
                self.assertEqual(got.metadata, {"round": 3, "strategy": strategy, "weighting": weighting})
                want = aggregate(3, self.global_tensors, updates, base, weighting)
                self.assertEqual(set(got.tensors), set(want))
                for p, t in want.items():
                    np.testing.assert_array_equal(got.tensors[p].data, t.data)
                    self.assertEqual(got.tensors[p].cls, t.cls)
                # The spleen head is the mean over every update, not only its owner's.
                if weighting == "examples":
                    mean = (5 * updates[1].tensors["heads.spleen.conv.weight"].data.astype(np.float64)
                            + 3 * updates[0].tensors["heads.spleen.conv.weight"].data.astype(np.float64)) / 8
                    np.testing.assert_array_equal(got.tensors["heads.spleen.conv.weight"].data, mean.astype(np.float32))

    def test_bad_update_metadata_is_a_clear_error(self):
        write_checkpoint(self.root / "bad.segviz", Checkpoint(CONFIG, {"client": "x"}, {}))
        r = self.run_tool("--global", str(self.root / "g.segviz"), "--updates", str(self.root / "bad.segviz"),
                          "--strategy", "fedbn", "--out", str(self.root / "o.segviz"))
        self.assertEqual(r.returncode, 2)
        self.assertIn("bad.segviz: metadata tasks must be a list of strings", r.stderr)
        self.assertFalse((self.root / "o.segviz").exists())


if __name__ == "__main__":
    unittest.main()
