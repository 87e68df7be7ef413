"""Per-device kernels of shardlax: the math that runs inside `jax.shard_map`.

Every collective of the project is called in this package. Each kernel's
docstring states its math, the shardings of its arguments and results, and
the collectives it runs forward and backward.
"""

from ._attention import dot_product_attention as dot_product_attention
from ._attention import head_parallel_attention as head_parallel_attention
from ._attention import rotary_embedding as rotary_embedding
from ._collectives import all_gather as all_gather
from ._collectives import all_reduce as all_reduce
from ._collectives import all_reduce_max as all_reduce_max
from ._collectives import all_to_all as all_to_all
from ._collectives import axis_index as axis_index
from ._collectives import axis_size as axis_size
from ._collectives import ensure_varying as ensure_varying
from ._collectives import gather_bits as gather_bits
from ._collectives import gather_bits_dtype as gather_bits_dtype
from ._collectives import ppermute as ppermute
from ._collectives import reduce_scatter as reduce_scatter
from ._collectives import ring_shift as ring_shift
from ._collectives import varying_axes as varying_axes
from ._cross_entropy import global_mean as global_mean
from ._cross_entropy import vocab_parallel_cross_entropy as vocab_parallel_cross_entropy
from ._dropout import global_bernoulli as global_bernoulli
from ._dropout import global_uniform_bits as global_uniform_bits
from ._dropout import shard_offsets as shard_offsets
from ._dropout import sharding_invariant_dropout as sharding_invariant_dropout
from ._embed import vocab_parallel_embed as vocab_parallel_embed
from ._embed import vocab_parallel_logits as vocab_parallel_logits
from ._fsdp import fsdp_call as fsdp_call
from ._fsdp import fsdp_gather as fsdp_gather
from ._fsdp import global_batch_moments as global_batch_moments
from ._linear import column_parallel_matmul as column_parallel_matmul
from ._linear import einsum_subscripts as einsum_subscripts
from ._linear import fused_column_matmul as fused_column_matmul
from ._linear import matmul_last as matmul_last
from ._linear import parallel_einsum as parallel_einsum
from ._linear import row_parallel_matmul as row_parallel_matmul
from ._linear import share_input as share_input
from ._mlp import parallel_mlp as parallel_mlp
from ._norm import rms_norm as rms_norm
from ._sequence import enter_tensor_parallel as enter_tensor_parallel
from ._sequence import exit_tensor_parallel as exit_tensor_parallel
from ._sequence import gather_sequence as gather_sequence
from ._sequence import scatter_sequence as scatter_sequence
from ._sequence import sequence_parallel_column_matmul as sequence_parallel_column_matmul
from ._sequence import sequence_parallel_row_matmul as sequence_parallel_row_matmul
from ._zero import all_gather_bucket as all_gather_bucket
from ._zero import all_reduce_bucket as all_reduce_bucket
from ._zero import all_reduce_then_shard_bucket as all_reduce_then_shard_bucket
from ._zero import local_shard as local_shard
from ._zero import pack_bucket as pack_bucket
from ._zero import reduce_scatter_bucket as reduce_scatter_bucket
from ._zero import shard_size as shard_size
from ._zero import sharded_tree_norm as sharded_tree_norm
from ._zero import unpack_bucket as unpack_bucket

__all__ = [
    "all_gather",
    "all_gather_bucket",
    "all_reduce",
    "all_reduce_bucket",
    "all_reduce_max",
    "all_reduce_then_shard_bucket",
    "all_to_all",
    "axis_index",
    "axis_size",
    "column_parallel_matmul",
    "dot_product_attention",
    "einsum_subscripts",
    "ensure_varying",
    "enter_tensor_parallel",
    "exit_tensor_parallel",
    "fsdp_call",
    "fsdp_gather",
    "fused_column_matmul",
    "gather_bits",
    "gather_bits_dtype",
    "gather_sequence",
    "global_batch_moments",
    "global_bernoulli",
    "global_mean",
    "global_uniform_bits",
    "head_parallel_attention",
    "local_shard",
    "matmul_last",
    "pack_bucket",
    "parallel_einsum",
    "parallel_mlp",
    "ppermute",
    "reduce_scatter",
    "reduce_scatter_bucket",
    "ring_shift",
    "rms_norm",
    "rotary_embedding",
    "row_parallel_matmul",
    "scatter_sequence",
    "sequence_parallel_column_matmul",
    "sequence_parallel_row_matmul",
    "shard_offsets",
    "shard_size",
    "sharded_tree_norm",
    "sharding_invariant_dropout",
    "share_input",
    "unpack_bucket",
    "varying_axes",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_embed",
    "vocab_parallel_logits",
]
