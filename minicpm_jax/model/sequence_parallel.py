"""Sequence (context) parallel attention: all-gather the keys and values across the `sequence` mesh axis.

With activations split along length over `sequence` (logical axis `act_length`), each device holds
T/n queries, keys and values. It gathers the keys, values and their segment ids of all n shards (the
backward of that all-gather is a reduce-scatter of their gradients) and attends its own queries,
which sit at offset shard·T/n of the gathered sequence, with any local kernel. Per device this costs
O(T) memory for the gathered keys and values and O(T²/n) compute; the shard holding the end of the
sequence does the most work under the causal mask (no load balancing: shards are contiguous).
The batch and head axes keep whatever mesh axes the logical rules give them, so this composes with
data, FSDP and tensor parallelism.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax.core import spmd

from minicpm_jax.parallel.mesh import partition_spec

SEQUENCE_AXIS = "sequence"


def sequence_sharded_attention(local_attention: Callable, q: jax.Array, k: jax.Array, v: jax.Array,
                               segment_ids: jax.Array) -> jax.Array:
    """`local_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset)` run per sequence shard.

    Needs a current mesh with a `sequence` axis and logical-axis rules (sharding.activate).
    """
    rules = spmd.get_logical_axis_rules()
    q_spec = partition_spec(("act_batch", "act_length", "heads", None), rules)
    kv_spec = partition_spec(("act_batch", "act_length", "kv_heads", None), rules)
    segment_spec = partition_spec(("act_batch", "act_length"), rules)
    for spec in (q_spec, kv_spec, segment_spec):
        if spec[1] != SEQUENCE_AXIS:
            raise ValueError(f"sequence-sharded attention needs act_length -> {SEQUENCE_AXIS!r} in the logical "
                             f"rules, got {spec[1]!r}")

    def per_shard(q, k, v, segment_ids):
        gather = lambda x: jax.lax.all_gather(x, SEQUENCE_AXIS, axis=1, tiled=True)
        q_offset = jax.lax.axis_index(SEQUENCE_AXIS) * q.shape[1]
        return local_attention(q, gather(k), gather(v), segment_ids, gather(segment_ids), q_offset)

    mesh = jax.sharding.get_abstract_mesh()
    # check_vma=False: a Pallas kernel's outputs (splash) carry no record of the axes they vary over.
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)
