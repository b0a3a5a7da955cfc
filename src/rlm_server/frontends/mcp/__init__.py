"""The MCP front end: `rlm-server mcp`, our engine behind the Model Context Protocol over stdio.

The official `mcp` SDK (2.x, the optional extra `rlm-server[mcp]`) speaks the protocol, both the
2025-11-25 handshake era and the stateless 2026-07-28 one; this package only says what the tools
are and runs them on the engine. bridge.py holds every call into the engine, paths.py reads
files under --allow-path, tools.py defines and runs the tools, server.py starts and stops.
"""
