"""The daemon: the service tree, the node's state, the control socket, systemd notification."""
