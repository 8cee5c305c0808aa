"""Where image models registered before ftl/model existed find their loader (`loader_module: ftl.pyfunc`)."""

from ftl.model.classifier import _load_pyfunc  # noqa: F401
