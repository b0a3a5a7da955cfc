"""rlm-server: a JSON-RPC 2.0 stdio server that runs Recursive Language Models."""

from typing import Any

__version__ = "0.1.0"
PROTOCOL_VERSION = "1"
SERVER_NAME = "rlm-server"

Json = dict[str, Any]  # a JSON object, as orjson reads and writes it
