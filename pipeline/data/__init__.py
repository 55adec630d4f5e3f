"""Trajectory data: storage URIs, the Parquet shard schema, the manifest, and model batches."""
