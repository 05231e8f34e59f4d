"""`workbench serve`: the HTTP API and the per-session MCP endpoints."""
