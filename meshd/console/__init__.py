"""The web console: status, events and a chat box for a browser."""
