"""Models built only from `shardlax.nn` layers."""

from ._tinylm import TinyLM as TinyLM
from ._tinylm import TinyLMConfig as TinyLMConfig
from ._tinylm import copy_params as copy_params

__all__ = ["TinyLM", "TinyLMConfig", "copy_params"]
