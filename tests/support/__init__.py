"""Test helpers: services, clusters, proxies and the checks the tests share."""
