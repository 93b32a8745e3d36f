-- `pggeolearn review export`: the chosen review objects as GeoJSON features in WGS 84
-- (RFC 7946), with what a mapping tool needs to judge them.
SELECT id, kind, status, class_name, iou, area_m2, note, map_ids,
       ST_AsGeoJSON(ST_Transform(geom, 4326), 7)
FROM {table}
WHERE kind = ANY (%(kinds)s) AND status = ANY (%(statuses)s)
ORDER BY id
