"""Pix2Video runtime: the edit itself, its CLI and the sidecar server.

Importing this package must stay cheap and must not import torch: the CLI starts fast and the
Blender add-on vendors ``protocol.py`` from here. Heavy imports live inside the functions that
need them.
"""

__version__ = "0.1.0"
