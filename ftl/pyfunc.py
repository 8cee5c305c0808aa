"""Where image models registered before ftl 0.2 find their loader (`loader_module: ftl.pyfunc`)."""

from ftl.model.classifier import _load_pyfunc  # noqa: F401
