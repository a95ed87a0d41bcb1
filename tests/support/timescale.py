"""How much longer the tests' condition waits may take here: KWATCH_TEST_TIME_SCALE (1 on a real machine).

The kernel matrix (vagrant/matrix.py) runs the tests in guests that QEMU emulates instruction by instruction (TCG),
several times slower than the host: a deadline sized for the host fails there for no fault of kwatch. Only waits
for a condition are stretched (how long the test may wait), never what a test asserts.
"""

from __future__ import annotations

import os

SCALE = max(1.0, float(os.environ.get("KWATCH_TEST_TIME_SCALE", "1") or 1))


def scaled(seconds: float) -> float:
    return seconds * SCALE
