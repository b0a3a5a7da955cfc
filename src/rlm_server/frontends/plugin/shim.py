"""`rlm-server-plugin-shim`: make `python -m elizaos_plugin_rlm.server` run our server.

The elizaOS plugin's clients start `$ELIZA_RLM_PYTHON_PATH -m elizaos_plugin_rlm.server`, so
switching them to us needs a module of that name. Installing `rlm-server` never creates it:
a package that shipped `elizaos_plugin_rlm` would silently overwrite (or be overwritten by) a
real `elizaos-plugin-rlm` in the same environment, since pip does not check that two
distributions own the same files. Instead this command writes a two-file package into the
site-packages of the interpreter the user names, after checking through that interpreter that
no other `elizaos_plugin_rlm` is importable there; it refuses otherwise. Every file it writes
carries a marker, so running it again updates only our own shim, and `--remove` deletes only
our own shim.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

PACKAGE = "elizaos_plugin_rlm"
MARKER = "written by rlm-server-plugin-shim"

INIT = f'''"""Not the elizaOS plugin: rlm-server's stand-in for it ({MARKER}).

Remove with `rlm-server-plugin-shim --remove`.
"""
'''

SERVER = f'''"""`python -m elizaos_plugin_rlm.server` runs rlm-server ({MARKER})."""

from rlm_server.frontends.plugin.frontend import main

if __name__ == "__main__":
    raise SystemExit(main())
'''

PROBE = """
import importlib.util, json, sysconfig
spec = importlib.util.find_spec("elizaos_plugin_rlm")
found = None
if spec is not None:
    found = list(spec.submodule_search_locations or []) or [spec.origin]
rlm = importlib.util.find_spec("rlm_server")
print(json.dumps({"found": found, "purelib": sysconfig.get_paths()["purelib"],
                  "has_server": rlm is not None}))
"""


class ShimError(Exception):
    """A reason not to touch the environment, for the user to read."""


def probe(python: str) -> dict[str, object]:
    """Ask the target interpreter where its packages go and what it can import already."""
    try:
        out = subprocess.run(
            [python, "-c", PROBE], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise ShimError(f"cannot run {python}: {error}") from None
    answer: dict[str, object] = json.loads(out)
    return answer


def is_ours(directory: Path) -> bool:
    init = directory / "__init__.py"
    return init.is_file() and MARKER in init.read_text(errors="replace")


def install(target: Path) -> Path:
    """Write the shim package into `target`; refuse if a package of that name is not ours."""
    package = target / PACKAGE
    if package.exists() and not is_ours(package):
        raise ShimError(f"{package} belongs to another package (the real elizaos-plugin-rlm?)")
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(INIT)
    (package / "server.py").write_text(SERVER)
    return package


def remove(target: Path) -> Path:
    package = target / PACKAGE
    if not package.exists():
        raise ShimError(f"no shim at {package}")
    if not is_ours(package):
        raise ShimError(f"{package} is not our shim; leaving it alone")
    shutil.rmtree(package)
    return package


def resolve_target(python: str, removing: bool) -> Path:
    """The site-packages of `python`, once it is known that the shim shadows nothing there."""
    found = probe(python)
    target = Path(str(found["purelib"]))
    locations = [Path(str(p)) for p in found["found"] or []]  # type: ignore[attr-defined]
    foreign = [p for p in locations if not is_ours(p if p.is_dir() else p.parent)]
    if foreign:
        raise ShimError(
            f"{python} already imports {PACKAGE} from {foreign[0]}: a real elizaos-plugin-rlm "
            "is installed there. Use another environment (python -m venv) for rlm-server."
        )
    if not removing and not found["has_server"]:
        raise ShimError(f"{python} cannot import rlm_server: pip install rlm-server there first")
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlm-server-plugin-shim",
        description="Let the elizaOS plugin's clients (ELIZA_RLM_PYTHON_PATH -m "
        "elizaos_plugin_rlm.server) start rlm-server. Refuses to touch an environment "
        "where the real elizaos-plugin-rlm is installed.",
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter to set up (default: this one)"
    )
    parser.add_argument("--target", type=Path, help="write into this directory instead")
    parser.add_argument("--remove", action="store_true", help="remove our shim")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target = args.target or resolve_target(args.python, args.remove)
        package = remove(target) if args.remove else install(target)
    except (ShimError, OSError) as error:
        print(f"rlm-server-plugin-shim: {error}", file=sys.stderr)
        return 1
    if args.remove:
        print(f"removed {package}")
    else:
        print(f"wrote {package}; set ELIZA_RLM_PYTHON_PATH={args.python}")
    return 0
