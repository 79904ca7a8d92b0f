"""What a train spec's dataset would fail on at run time, found before anything starts by reading
its manifest only (one small object, whatever the dataset's size)."""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.data.cache import default_cache_dir, default_limit, expand_cache_dir
from actors.data.loader import check_cache, order_for, working_set_bytes
from actors.data.shards import ShardError, read_manifest
from orchestrator.batch import BatchPlan
from orchestrator.spec import TrainSpec, data_partitions
from orchestrator.storage import StorageError, is_local


@dataclass
class DataCheck:
    """``errors``: ``(field path, reason)``; ``notes``: what the loader will do, for people;
    ``schema``: the dataset's columns (None when it could not be read)."""
    errors: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    schema: dict | None = None


def check_dataset(spec: TrainSpec) -> DataCheck:
    """A dataset that is missing, whose global batch cannot make a step, or whose shuffle cannot
    work in the node cache (a block larger than ``dataset.cache_limit``, or a global shuffle of a
    remote dataset larger than it) is an error naming the field."""
    d, ds = spec.dataset, spec.deepspeed
    opts = spec.storage.as_options()
    out = DataCheck()
    try:
        m = read_manifest(d.url, opts)
    except (ShardError, StorageError) as e:
        out.errors.append(("dataset.url", str(e)))
        return out
    out.schema = m.schema
    if d.shuffle.tail == "drop" and ds.global_batch_size > m.num_samples:
        out.errors.append(("deepspeed.global_batch_size", f"global_batch_size ({ds.global_batch_size}) exceeds "
                           f"the dataset's {m.num_samples} samples: with shuffle.tail 'drop' no step fits in an epoch"))
        return out
    remote = not is_local(d.url)
    mib = 2**20
    where = f"{m.num_samples} samples in {m.num_shards} shards, {m.total_bytes / mib:,.1f} MiB"
    if not remote:
        out.notes.append(f"dataset: local ({where}), mapped in place; shuffle {d.shuffle.mode}"
                         + (" -> global" if d.shuffle.mode == "auto" else ""))
        return out
    limit = d.cache_limit or default_limit(expand_cache_dir(d.cache_dir or default_cache_dir()))
    order = order_for(d.shuffle, m, global_batch_size=ds.global_batch_size, partitions=data_partitions(spec),
                      remote=remote, cache_limit=limit)
    plan = BatchPlan.of(spec)
    fewest = plan.min_allowed
    per_rank = plan.per_rank(fewest)  # the fewest workers: the most each rank reads
    in_flight = max(1, min(d.prefetch_batches, d.max_prefetch_mb * mib // (per_rank * m.row_bytes)))
    held = working_set_bytes(order, m, 0, per_rank, in_flight + 2)
    limit_from = "dataset.cache_limit" if d.cache_limit else "default: half the free disk here"
    shape = (f", {order.partitions} partitions, blocks of {order.window} samples"
             if order.mode == "partitioned" else "")
    out.notes.append(f"dataset: remote ({where}); node cache limit {limit / mib:,.1f} MiB ({limit_from}); "
                     f"shuffle {d.shuffle.mode}{' -> ' + order.mode if d.shuffle.mode == 'auto' else ''}{shape}; "
                     f"a worker holds at most {held / mib:,.1f} MiB of it")
    try:
        check_cache(order, m, 0, per_rank, limit,
                    f"a node running {fewest} worker(s)" if d.cache_limit else
                    f"a node running {fewest} worker(s) ({limit_from})", in_flight + 2)
    except ValueError as e:
        out.errors.append(("dataset.cache_limit", str(e)))
    return out
