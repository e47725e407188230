"""Pix2Video runtime: the edit itself, its CLI and the sidecar server.

Importing this package must stay cheap and must not import torch: the CLI starts fast and the
Blender add-on vendors ``protocol.py`` from here. The modules of the edit itself (editor, models,
inversion, attention, ...) import torch at their top; the light ones (protocol, settings, client,
cli, frames, metrics, files) do not, and the CLI imports the heavy ones inside its handlers.
"""

__version__ = "0.1.0"
