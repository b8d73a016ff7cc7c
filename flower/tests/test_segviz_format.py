"""The model-file reader and writer: safetensors layout, round trip, refusal of damaged files."""

import json
import os
import struct
import tempfile
import unittest
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

import _path  # noqa: F401
from segviz_flower.segviz_format import (
    LEGACY_MAGIC,
    Checkpoint,
    SegVizFormatError,
    Tensor,
    TensorClass,
    classification_from_json,
    classification_to_json,
    decode_checkpoint,
    encode_checkpoint,
    read_checkpoint,
    write_checkpoint,
)

REPR = TensorClass(None, False, True)
BN_STAT = TensorClass(None, True, False)
LIVER = TensorClass("liver", False, True)
CONFIG = {
    "representation": {"in_channels": 1, "channels": [4, 8], "strides": [2], "num_res_units": 1},
    "tasks": ["liver"],
    "head_out_channels": 2,
}


def sample() -> Checkpoint:
    return Checkpoint(
        config=CONFIG,
        metadata={"round": 3, "note": "é"},
        tensors={
            # Deliberately not in path order: the writer sorts.
            "representation.down.0.units.0.conv.weight": Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), REPR),
            "heads.liver.block.upsample.bias": Tensor(np.array([0.5, -1.25], np.float32), LIVER),
            "representation.down.0.units.0.adn.norm.running_var": Tensor(np.ones(2, np.float32), BN_STAT),
        },
    )


class Layout(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "model.segviz"
        write_checkpoint(self.path, sample())

    def tearDown(self):
        self.dir.cleanup()

    def test_the_safetensors_package_reads_tensors_and_metadata(self):
        with safetensors.safe_open(self.path, framework="numpy") as f:
            meta = f.metadata()
            self.assertEqual(sorted(f.keys()), sorted(sample().tensors))
            np.testing.assert_array_equal(
                f.get_tensor("representation.down.0.units.0.conv.weight"), np.arange(6).reshape(2, 3)
            )
            self.assertEqual(f.get_tensor("heads.liver.block.upsample.bias").dtype, np.float32)
        self.assertEqual(meta["format"], "segviz")
        self.assertEqual(meta["format_version"], "2")
        self.assertEqual(json.loads(meta["config"]), CONFIG)
        self.assertEqual(json.loads(meta["metadata"]), {"round": 3, "note": "é"})
        entries = json.loads(meta["tensors"])
        self.assertEqual([t["path"] for t in entries], sorted(t["path"] for t in entries))
        self.assertEqual(entries[0]["role"], {"head": "liver"})
        self.assertEqual(
            {k: v for k, v in entries[1].items() if k != "crc32"},
            {
                "path": "representation.down.0.units.0.adn.norm.running_var",
                "role": "representation",
                "batch_norm": True,
                "trainable": False,
            },
        )
        self.assertNotIn(" ", meta["tensors"])  # serde_json's compact form

    def test_byte_order_of_paths(self):
        c = Checkpoint(CONFIG, {}, {p: Tensor(np.zeros(1, np.float32), REPR) for p in ["b", "B", "a.1", "a_1", "a"]})
        write_checkpoint(self.path, c)
        with safetensors.safe_open(self.path, framework="numpy") as f:
            paths = [t["path"] for t in json.loads(f.metadata()["tensors"])]
        self.assertEqual(paths, ["B", "a", "a.1", "a_1", "b"])


class RoundTrip(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "sub" / "model.segviz"

    def tearDown(self):
        self.dir.cleanup()

    def test_round_trip(self):
        write_checkpoint(self.path, sample())
        back = read_checkpoint(self.path)
        self.assertEqual(back.config, CONFIG)
        self.assertEqual(back.metadata, {"round": 3, "note": "é"})
        self.assertEqual(set(back.tensors), set(sample().tensors))
        for p, t in sample().tensors.items():
            np.testing.assert_array_equal(back.tensors[p].data, t.data)
            self.assertEqual(back.tensors[p].data.dtype, np.float32)
            self.assertEqual(back.tensors[p].cls, t.cls)
        # Re-encoding what was read gives the same content.
        again = decode_checkpoint(encode_checkpoint(back))
        self.assertEqual((again.config, again.metadata, set(again.tensors)), (back.config, back.metadata, set(back.tensors)))
        # No temporary file is left behind.
        self.assertEqual(os.listdir(self.path.parent), ["model.segviz"])

    def test_overwrite_is_atomic_replace(self):
        write_checkpoint(self.path, sample())
        c = sample()
        c.metadata = {"round": 4}
        write_checkpoint(self.path, c)
        self.assertEqual(read_checkpoint(self.path).metadata, {"round": 4})

    def test_empty_and_scalar_shapes(self):
        c = Checkpoint(CONFIG, None, {"e": Tensor(np.zeros((0, 3), np.float32), REPR), "s": Tensor(np.float32(2.0), REPR)})
        back = decode_checkpoint(encode_checkpoint(c))
        self.assertEqual(back.tensors["e"].data.shape, (0, 3))
        self.assertEqual(back.tensors["s"].data.shape, ())
        self.assertEqual(float(back.tensors["s"].data), 2.0)


class Damage(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "model.segviz"
        write_checkpoint(self.path, sample())
        self.good = self.path.read_bytes()

    def tearDown(self):
        self.dir.cleanup()

    def assert_refused(self, data: bytes, words: str):
        self.path.write_bytes(data)
        with self.assertRaises(SegVizFormatError) as ctx:
            read_checkpoint(self.path)
        self.assertIn(str(self.path), str(ctx.exception))
        self.assertIn(words, str(ctx.exception))

    def test_not_safetensors(self):
        self.assert_refused(b"NOTSEGVZ" + self.good[8:], "not a SegViz model file")
        self.assert_refused(self.good[:5], "not a SegViz model file")

    def test_first_format_points_to_the_upgrade(self):
        self.assert_refused(LEGACY_MAGIC + b"\0" * 30, "upgrade_model")

    def test_truncated(self):
        for cut in (1, 8, 100, len(self.good) - 30):
            self.assert_refused(self.good[:-cut], "truncated or corrupted")

    def test_flipped_bit_in_the_values(self):
        data = bytearray(self.good)
        data[-3] ^= 0x04
        self.assert_refused(bytes(data), "CRC-32 mismatch")

    def rewrite(self, edit) -> bytes:
        self.path.write_bytes(self.good)
        with safetensors.safe_open(self.path, framework="numpy") as f:
            meta = dict(f.metadata())
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        edit(meta, arrays)
        return safetensors.numpy.save(arrays, metadata=meta)

    def test_foreign_safetensors(self):
        self.assert_refused(safetensors.numpy.save({"w": np.zeros(2, np.float32)}), "not a SegViz model file")
        self.assert_refused(self.rewrite(lambda m, a: m.update(format="other")), "not a SegViz model file")
        self.assert_refused(self.rewrite(lambda m, a: m.update(format_version="3")), "format version")

    def test_metadata_and_tensors_must_agree(self):
        self.assert_refused(self.rewrite(lambda m, a: a.update(extra=np.zeros(1, np.float32))), "lists 3 tensors")
        self.assert_refused(self.rewrite(lambda m, a: m.update(config="{")), "malformed metadata 'config'")

    def test_bad_role(self):
        self.assert_refused(
            self.rewrite(lambda m, a: m.update(tensors=m["tensors"].replace('{"head":"liver"}', '{"tail":"liver"}'))),
            "role must be",
        )

    def test_missing_file(self):
        with self.assertRaises(SegVizFormatError) as ctx:
            read_checkpoint(Path(self.dir.name) / "absent.segviz")
        self.assertIn("absent.segviz", str(ctx.exception))


class Classification(unittest.TestCase):
    def test_round_trip_and_errors(self):
        text = classification_to_json(sample().tensors)
        parsed = classification_from_json(text, "client a")
        self.assertEqual(parsed["heads.liver.block.upsample.bias"], LIVER)
        self.assertEqual(parsed["representation.down.0.units.0.adn.norm.running_var"], BN_STAT)
        with self.assertRaisesRegex(SegVizFormatError, "client a: classification is not valid JSON"):
            classification_from_json("{", "client a")
        with self.assertRaisesRegex(SegVizFormatError, "client a: tensor x: role must be"):
            classification_from_json('{"x": {"role": "head", "batch_norm": false, "trainable": true}}', "client a")
        with self.assertRaisesRegex(SegVizFormatError, "must have role, batch_norm and trainable"):
            classification_from_json('{"x": {"role": "representation"}}', "client a")


if __name__ == "__main__":
    unittest.main()
