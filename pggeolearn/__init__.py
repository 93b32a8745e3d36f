"""pggeolearn: PostGIS as a training-data service for geospatial deep learning."""

__version__ = "0.1.0"
