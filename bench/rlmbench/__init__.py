"""rlm-server's benchmark suite: ours against the elizaOS plugin's server and the `rlm` library.

Run it with `bench/run` (see bench/README.md). Modules:
  procs           spawning the three servers and the fixture; a raw-pipe line channel; RSS
  figures         one function per measured figure
  report          the table (stdout, JSON, markdown) and the concurrency plot (SVG)
  library_direct  the `rlm` library called directly in one process (run as a subprocess)
"""
