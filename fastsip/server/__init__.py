"""``fastsip serve``: the multi-process edge registrar (the only code that touches sockets).

See docs/server.md.  Entry points: ``fastsip serve`` (``fastsip.cli``) and
``python -m fastsip.server``.
"""
