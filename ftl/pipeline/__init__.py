"""The Ray Data plan that extract, predict and fine-tuning share: readers, actor pools, tuning."""
