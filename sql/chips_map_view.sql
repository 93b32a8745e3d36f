-- `chips map`: chip footprints of one dataset for QGIS. The cast gives the geometry column a
-- type modifier (Polygon, SRID), so QGIS lists the view with its CRS without a full scan.
CREATE VIEW {view} AS
SELECT c.tile_id,
       c.split,
       c.nodata_frac,
       c.image IS NULL AS orphan,
       c.recipe_hash = {recipe_hash} AS current,
       {fractions},
       c.built_at,
       c.geom::geometry(Polygon, {srid}) AS geom
FROM pggeolearn.chips AS c
WHERE c.dataset = {dataset}
