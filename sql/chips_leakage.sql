-- Train chips that lie within the guard distance of a val or test chip, or overlap one.
-- Distances are in ground metres: coordinates are scaled by ground metres per CRS unit
-- (%(kx)s, %(ky)s, from pggeolearn.ground_scale at the extent centre) before ST_DWithin; the
-- bounding-box test (&&, GiST index chips_geom_idx) only preselects candidates.
-- %(guard)s is the guard shrunk by a relative 1e-6, so that a chip exactly the guard distance
-- away (a whole number of tiles on the grid) is not counted; overlaps count whatever the
-- guard, when the shared area exceeds %(min_area)s (float noise between adjacent tiles is not
-- an overlap).
SELECT count(DISTINCT a.tile_id)
FROM pggeolearn.chips AS a
JOIN pggeolearn.chips AS b
  ON b.dataset = a.dataset
 AND b.split IN ('val', 'test')
 AND b.geom && ST_Expand(a.geom, %(gx)s, %(gy)s)
 AND ((%(guard)s > 0 AND ST_DWithin(ST_Scale(a.geom, %(kx)s, %(ky)s),
                                     ST_Scale(b.geom, %(kx)s, %(ky)s), %(guard)s))
      OR (a.geom && b.geom AND ST_Area(ST_Intersection(a.geom, b.geom)) > %(min_area)s))
WHERE a.dataset = %(dataset)s AND a.split = 'train'
