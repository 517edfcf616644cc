"""The command-line layer: one small module per command group, wired by ``app``."""
