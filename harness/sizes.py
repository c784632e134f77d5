"""Byte sizes written by users (``--max-size``, ``--golden-cache-max`` and the size variables): one
reading everywhere.

``500MB``, ``2G``, ``1.5gb``: decimal units (k, M, G, T = 10^3 ... 10^12), as disks are sold;
``512MiB``, ``4Gi``: binary units (Ki, Mi, Gi, Ti = 2^10 ... 2^40); a bare number is bytes.
"""
from __future__ import annotations

import re
from decimal import Decimal

from harness.errors import HarnessError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?))?b?\s*$", re.IGNORECASE)
_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str, what: str) -> int:
    """Bytes of ``text``; HarnessError naming ``what`` (the option or variable) when it is not a size."""
    m = _SIZE_RE.match(text)
    if not m:
        raise HarnessError(f"{what} {text!r}: expected a size such as 500MB, 2GB, 4GiB or a byte count")
    number, unit, binary = m.groups()
    scale = 1 if unit is None else (1024 if binary else 1000) ** _POWER[unit.lower()]
    return int(Decimal(number) * scale)  # exact: 10^6 TB is 10^18, beyond a float's 2^53
