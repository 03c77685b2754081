"""Placement policies that ship with meshd, registered like any operator plugin.

``default`` is DESIGN.md's placement table; operator plugins (``plugins/``
in the source tree, ``/etc/meshd/plugins.d/``, ``[policy] plugins``) are
asked before it.  See ``docs/plugins.md``.
"""
