"""Rasters and vectors into PostGIS tables: COPY-speed loads, constraints, indexes, statistics.

Both importers write one table in one transaction and return a report whose ``str()`` is what
the CLI prints. Tables loaded by ``raster2pgsql -I -C -F -t 256x256``, ``ogr2ogr`` or
``osm2pgsql`` work just as well downstream; these exist so that a notebook or the CLI needs
no GDAL command-line tools.
"""

from pggeolearn.importers.raster import ImportReport, import_raster
from pggeolearn.importers.vector import VectorImportReport, import_vector

__all__ = ["ImportReport", "VectorImportReport", "import_raster", "import_vector"]
