"""Placement: hook specifications, the plugin manager, the default policy, the rules and the election."""
