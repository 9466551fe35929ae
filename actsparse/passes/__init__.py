"""FX passes on the Dynamo graph, one job per module, run in the order of ``pipeline.PASSES``."""

from .context import PassContext, RewriteStats
from .find_sites import Site, discover_sites, site_table
from .pipeline import PASSES, run_passes

__all__ = ["PASSES", "PassContext", "RewriteStats", "Site", "discover_sites", "run_passes", "site_table"]
