"""The data's way in: a dataset in its own layout (sources, fetch) becomes checked Parquet shards,
ground truth and a manifest (prep, shards), read back as training batches (dataset, augment);
bindings says which prepared data a run trains and is evaluated on.
"""
