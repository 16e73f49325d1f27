"""Progress bars: one switch for ``wfcore -q``.

The CLI sets tqdm's own ``TQDM_DISABLE``, which hides every bar that does not pass
``disable`` itself; the bars that do pass it combine their condition with this switch.
"""

from __future__ import annotations

import os


def disabled(*conditions: bool) -> bool:
    """True when any condition holds or bars are switched off (``TQDM_DISABLE``)."""
    return any(conditions) or os.environ.get("TQDM_DISABLE", "").lower() not in (
        "", "0", "false")
