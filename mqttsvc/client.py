"""
The old import path of L{mqttsvc.rpcclient}, kept for one release so that a
backend written against it keeps working; importing it warns.

The JSON-RPC client was renamed for what it is: in a project whose other
client speaks MQTT, "client" named neither. Import C{mqttsvc.rpcclient}.
"""

from __future__ import annotations

import warnings

from mqttsvc.rpcclient import *  # noqa: F403
from mqttsvc.rpcclient import __all__  # noqa: F401

warnings.warn(
    "mqttsvc.client is deprecated and will be removed in the next release: "
    "import mqttsvc.rpcclient instead",
    DeprecationWarning,
    stacklevel=2,
)
