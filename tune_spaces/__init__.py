"""The shipped search spaces (``*.yaml``), installed with the package so that ``--space NAME``
finds them from any install, editable or not."""
