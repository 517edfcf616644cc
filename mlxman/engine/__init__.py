"""The serving engine: runs requests on a resident base, batching rows with different adapters together."""
