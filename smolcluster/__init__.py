"""smolcluster: data-parallel training across a home cluster of mixed machines."""

__version__ = "0.1.0"
