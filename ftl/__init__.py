"""ftl: feature-based transfer learning at cluster scale."""

__version__ = "0.1.0"
