"""A model and its adapters sharded over several machines with MLX's distributed engine (``mlx.launch``)."""
