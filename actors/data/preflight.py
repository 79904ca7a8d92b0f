"""What a train spec's dataset would fail on at run time, found before anything starts by reading
its manifest only (one small object, whatever the dataset's size)."""

from __future__ import annotations

from actors.data.cache import default_cache_dir, default_limit, expand_cache_dir
from actors.data.loader import check_cache, order_for
from actors.data.shards import ShardError, read_manifest
from orchestrator.spec import TrainSpec, data_partitions, feasible_worker_counts
from orchestrator.storage import Storage, StorageError


def dataset_errors(spec: TrainSpec) -> list[tuple[str, str]]:
    """``(field path, reason)`` for a dataset that is missing, whose global batch cannot make a step,
    or whose shuffle cannot work in the node cache (a block larger than ``dataset.cache_limit``,
    or a global shuffle of a remote dataset larger than it)."""
    d, ds = spec.dataset, spec.deepspeed
    opts = spec.storage.as_options()
    try:
        m = read_manifest(d.url, opts)
    except (ShardError, StorageError) as e:
        return [("dataset.url", str(e))]
    if d.shuffle.tail == "drop" and ds.global_batch_size > m.num_samples:
        return [("deepspeed.global_batch_size", f"global_batch_size ({ds.global_batch_size}) exceeds the "
                 f"dataset's {m.num_samples} samples: with shuffle.tail 'drop' no step fits in an epoch")]
    remote = Storage(d.url, opts).local_path() is None
    if not remote:
        return []
    limit = d.cache_limit or default_limit(expand_cache_dir(d.cache_dir or default_cache_dir()))
    order = order_for(d.shuffle, m, global_batch_size=ds.global_batch_size, partitions=data_partitions(spec),
                      remote=remote, cache_limit=limit)
    fewest = min(feasible_worker_counts(spec))  # the most each rank reads
    per_rank = ds.global_batch_size // fewest
    in_flight = max(1, min(d.prefetch_batches, d.max_prefetch_mb * 2**20 // (per_rank * m.row_bytes)))
    try:
        check_cache(order, m, 0, per_rank, limit,
                    f"a node running {fewest} worker(s)" if d.cache_limit else
                    f"a node running {fewest} worker(s) (default limit: half the free disk here)", in_flight + 2)
    except ValueError as e:
        return [("dataset.cache_limit", str(e))]
    return []
