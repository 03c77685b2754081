"""Passive nodes (clients, standbys): the route server on active nodes and the route client."""
