"""The CPU backend's on/off environment switches (DIPTYCH_CPU_INT8, DIPTYCH_CPU_BF16,
DIPTYCH_CPU_TAPE): each is on unless set to 0, false, no or off."""

from __future__ import annotations

import os


def switched_on(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")
