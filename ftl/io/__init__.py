"""Storage and the Parquet contract: URIs to filesystems, schemas, the sink, the incremental diff."""
