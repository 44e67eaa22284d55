"""Checkpoints: resolving model sources (`registry`), reading GGUF files (`gguf`).

Submodules are imported on use; this package imports nothing heavy.
"""
