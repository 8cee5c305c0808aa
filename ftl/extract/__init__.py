"""`ftl extract`: images to backbone features in Parquet."""
