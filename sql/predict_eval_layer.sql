-- evaluate: the per-tile metrics layer for QGIS: one row per chip of the split, its footprint
-- typed geometry(Polygon, srid) (so QGIS knows type and CRS), pixel accuracy, mean IoU and one
-- IoU column per class (iou_<class>); NULL where a class is in neither truth nor prediction.
CREATE TABLE {table} (
    tile_id integer PRIMARY KEY,
    split text NOT NULL,
    pixels bigint NOT NULL,
    pixel_accuracy real,
    miou real,
    {iou_columns},
    model text NOT NULL,
    run_id bigint NOT NULL,
    geom geometry(Polygon, {srid}) NOT NULL
)
