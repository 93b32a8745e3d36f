"""The ``pggeolearn`` command: thin click groups over library calls, one module per group."""
