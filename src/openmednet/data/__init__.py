"""Data: readers for medical image formats, the corpus builder, shards, transforms and datasets."""
