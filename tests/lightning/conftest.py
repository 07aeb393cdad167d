"""Lightning tests: skip cleanly without lightning; shared trainer builder."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning", reason="the [lightning] extra is not installed")
