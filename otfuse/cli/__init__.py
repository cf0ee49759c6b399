"""The ``otfuse`` command line."""
