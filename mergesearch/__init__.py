"""Shared foundation of the mergesearch packages: the version and the user-error type.

`search`, `merging`, `evaluators` and `storage` all import from here and from nothing
above their own layer, so this package stays tiny and dependency-free.
"""

__version__ = "0.1.0"
