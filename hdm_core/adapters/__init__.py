"""Adapters on XUT, one package: `network` (what to train, the library's network hooked in), `files` (the adapter
file format, reading and writing), `apply` (deltas into and back out of a model for inference), `merge` (a checkpoint
with adapters merged in). Modules import only downward (network <- files <- apply <- merge); this file imports none
of them, so the torch-free modules stay torch-free."""
