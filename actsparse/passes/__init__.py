"""FX passes on the Dynamo graph: site discovery, plan checks, mask insertion."""

from .pipeline import PASSES, run_passes
from .sites import Site, discover_sites, site_table

__all__ = ["PASSES", "run_passes", "Site", "discover_sites", "site_table"]
