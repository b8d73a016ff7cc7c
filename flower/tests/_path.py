"""Puts flower/ on sys.path so the tests import segviz_flower without installing it."""

import sys
from pathlib import Path

FLOWER_DIR = Path(__file__).resolve().parent.parent
if str(FLOWER_DIR) not in sys.path:
    sys.path.insert(0, str(FLOWER_DIR))
