"""Models built only from `shardlax.nn` layers."""

__all__: list[str] = []
