"""Sharded, shuffled, exactly-once resumable data for trainer workers.

Public surface: :func:`write_shards` / :func:`read_manifest` (the shard format), :class:`DataLoader`
(one per trainer rank, backed by a Ray loader actor), :class:`EpochOrder` and
:func:`global_step_sample_ids` (the pure order), :class:`NodeCache` (the bounded node cache) and
:func:`score_order` (shuffle quality).
"""

from actors.data.cache import CacheFullError, NodeCache
from actors.data.loader import DataLoader, global_step_sample_ids
from actors.data.quality import expected_shards_per_batch, score_order
from actors.data.server import ShardServer
from actors.data.shards import Manifest, ShardError, ShardInfo, read_manifest, write_shards
from actors.data.shuffle import EpochOrder

__all__ = ["CacheFullError", "DataLoader", "EpochOrder", "Manifest", "NodeCache", "ShardError", "ShardInfo",
           "ShardServer", "expected_shards_per_batch", "global_step_sample_ids", "read_manifest",
           "score_order", "write_shards"]
