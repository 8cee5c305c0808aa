"""Tests on several `ray start` nodes, the cluster launcher's config, deployment and faults."""
