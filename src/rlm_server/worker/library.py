"""The `rlm` library, imported as this server needs it.

`import rlm.clients` calls `load_dotenv()`, which reads a `.env` file from the working directory
into the process environment. The server's keys are the ones its client chose, and a worker must
hold none, so neither the server nor the zygote ever reads one: call `without_dotenv()` before
the first import of `rlm`.
"""

from __future__ import annotations


def without_dotenv() -> None:
    import dotenv

    dotenv.load_dotenv = lambda *args, **kwargs: False
