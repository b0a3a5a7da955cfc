"""`python -m rlm_server` is the same as the `rlm-server` console script."""

from rlm_server.cli import main

raise SystemExit(main())
