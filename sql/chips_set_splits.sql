-- Store a split assignment: one (tile_id, split) pair per chip of the dataset.
UPDATE pggeolearn.chips AS c
SET split = u.split
FROM unnest(%(tile_ids)s::integer[], %(splits)s::text[]) AS u(tile_id, split)
WHERE c.dataset = %(dataset)s AND c.tile_id = u.tile_id
  AND c.split IS DISTINCT FROM u.split
