"""The .segviz reader and writer: layout, round trip, and refusal of damaged files."""

import json
import os
import struct
import tempfile
import unittest
from pathlib import Path

import numpy as np

import _path  # noqa: F401
from segviz_flower.segviz_format import (
    MAGIC,
    Checkpoint,
    SegVizFormatError,
    Tensor,
    TensorClass,
    classification_from_json,
    classification_to_json,
    decode_checkpoint,
    encode_checkpoint,
    fnv1a64,
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


class Fnv(unittest.TestCase):
    def test_known_vectors(self):
        self.assertEqual(fnv1a64(b""), 0xCBF29CE484222325)
        self.assertEqual(fnv1a64(b"a"), 0xAF63DC4C8601EC8C)
        self.assertEqual(fnv1a64(b"foobar"), 0x85944171F73967E8)


class Layout(unittest.TestCase):
    def test_bytes_match_the_rust_layout(self):
        data = encode_checkpoint(sample())
        self.assertEqual(data[:8], MAGIC)
        (n,) = struct.unpack("<Q", data[8:16])
        header = json.loads(data[16 : 16 + n])
        paths = [t["path"] for t in header["tensors"]]
        self.assertEqual(paths, sorted(paths))
        self.assertEqual(header["tensors"][0]["role"], {"head": "liver"})
        self.assertEqual(header["tensors"][1]["role"], "representation")
        self.assertEqual(
            header["tensors"][1],
            {
                "path": "representation.down.0.units.0.adn.norm.running_var",
                "shape": [2],
                "role": "representation",
                "batch_norm": True,
                "trainable": False,
            },
        )
        self.assertEqual(list(header), ["config", "metadata", "tensors"])
        self.assertNotIn(b" ", data[16 : 16 + n])  # serde_json's compact form
        values = np.frombuffer(data[16 + n : -8], dtype="<f4")
        np.testing.assert_array_equal(values, [0.5, -1.25, 1, 1, 0, 1, 2, 3, 4, 5])
        self.assertEqual(struct.unpack("<Q", data[-8:])[0], fnv1a64(data[:-8]))

    def test_byte_order_of_paths(self):
        c = Checkpoint(CONFIG, {}, {p: Tensor(np.zeros(1, np.float32), REPR) for p in ["b", "B", "a.1", "a_1", "a"]})
        data = encode_checkpoint(c)
        (n,) = struct.unpack("<Q", data[8:16])
        self.assertEqual([t["path"] for t in json.loads(data[16 : 16 + n])["tensors"]], ["B", "a", "a.1", "a_1", "b"])


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
        # Re-encoding what was read gives the same bytes.
        self.assertEqual(encode_checkpoint(back), self.path.read_bytes())
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

    def test_bad_magic(self):
        self.assert_refused(b"NOTSEGVZ" + self.good[8:], "bad magic")

    def test_too_short(self):
        self.assert_refused(self.good[:20], "too short")

    def test_truncated(self):
        for cut in (1, 8, 9, 100, len(self.good) - 30):
            self.assert_refused(self.good[:-cut], "checksum mismatch")

    def test_flipped_bit(self):
        for at in (9, 40, len(self.good) - 12, len(self.good) - 1):
            data = bytearray(self.good)
            data[at] ^= 0x04
            self.assert_refused(bytes(data), "checksum mismatch")

    def reseal(self, body: bytes) -> bytes:
        return body + struct.pack("<Q", fnv1a64(body))

    def test_header_length_past_end(self):
        body = bytearray(self.good[:-8])
        body[8:16] = struct.pack("<Q", 10**9)
        self.assert_refused(self.reseal(bytes(body)), "header length runs past the end")

    def test_tensor_past_end_and_extra_bytes(self):
        body = self.good[:-8]
        self.assert_refused(self.reseal(body[:-4]), "runs past the end of the file")
        self.assert_refused(self.reseal(body + b"\0\0\0\0"), "4 unexpected bytes")

    def test_bad_role(self):
        data = self.good.replace(b'{"head":"liver"}', b'{"tail":"liver"}')
        self.assert_refused(self.reseal(data[:-8]), "role must be")

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
