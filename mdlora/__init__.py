"""mdlora: the base layer shared by every package (version, typed config loading, atomic I/O).

Imports flow ``jobs -> infra -> trainer -> {embeddings, adapters} -> mdlora``; this package
imports nothing of the others.
"""

__version__ = "0.1.0"
