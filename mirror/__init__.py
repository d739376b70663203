"""mirror: a pull-through caching mirror and private registry for container images."""

__version__ = "0.1.0"
