"""The model library: what models and adapters a user has, and short names for them."""
