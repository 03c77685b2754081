"""Backends: supervised llama-server and rpc-server processes."""
