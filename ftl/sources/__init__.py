"""Listing a dataset: imagefolders, manifests and WebDataset shards, with a stable id per image."""
