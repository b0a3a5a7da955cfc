"""Start the elizaOS plugin's own stdio server (elizaos-plugin-rlm 2.0.0a5), unchanged.

Run with the interpreter of bench/.venv-plugin. Two things stand between `python -m
elizaos_plugin_rlm.server` and a working server, and this launcher works around both without
changing any of the plugin's code:

1. The package's `__init__` imports `plugin.py`, which imports the `elizaos` framework (not
   installable: PyPI has no release that satisfies its `elizaos>=1,<2` requirement). So we build
   the package module ourselves, with `__path__` pointing at the installed directory, and import
   `elizaos_plugin_rlm.server` under it: `server.py` needs only `client.py`, which needs only the
   standard library and (optionally) `rlm`.
2. Its `RLMConfig` reads backend, environment, iterations etc. from `ELIZA_RLM_*`, but the model
   name and base URL only from `backend_kwargs`, which no variable fills (`ELIZA_RLM_ROOT_MODEL`
   is read but never passed to the library). With an empty `backend_kwargs` every `infer` fails
   with "Model name is required". So, when `ELIZA_RLM_BASE_URL` is set, we pass the same
   `model_name`, `base_url` and `api_key` that rlm-server passes to the library, through the
   plugin's public entry point `run_server(config)`, exactly as its docstring shows.

`--no-rlm` hides the `rlm` library from the plugin, to time its start-up in stub mode.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.abc
import importlib.util
import os
import sys
import types


class _HideRlm(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "rlm" or name.startswith("rlm."):
            raise ImportError(f"{name} hidden by bench/plugin_server.py --no-rlm")
        return None


def load_server_module() -> types.ModuleType:
    spec = importlib.util.find_spec("elizaos_plugin_rlm")  # finds the package, runs nothing
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("elizaos_plugin_rlm is not installed in this interpreter")
    package = types.ModuleType("elizaos_plugin_rlm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = "elizaos_plugin_rlm"
    package.__file__ = spec.origin
    sys.modules["elizaos_plugin_rlm"] = package  # its __init__ is never executed
    return importlib.import_module("elizaos_plugin_rlm.server")


def main() -> None:
    if "--no-rlm" in sys.argv[1:]:
        sys.meta_path.insert(0, _HideRlm())
    server = load_server_module()
    config = None
    base_url = os.environ.get("ELIZA_RLM_BASE_URL")
    if base_url:
        client = sys.modules["elizaos_plugin_rlm.client"]
        config = client.RLMConfig(
            backend_kwargs={
                "model_name": os.environ.get("ELIZA_RLM_MODEL", "scripted"),
                "base_url": base_url,
                "api_key": os.environ.get("OPENAI_API_KEY", "not-needed"),
            }
        )
    asyncio.run(server.run_server(config))  # what its own main() does, plus the config


if __name__ == "__main__":
    main()
