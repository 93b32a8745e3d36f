-- The staging table holds exactly one row per tile of the batch: nothing the recipe's SQL
-- could have added (temporary tables are writable even in READ ONLY transactions).
SELECT count(*) = cardinality(%(tile_ids)s::integer[])
       AND count(DISTINCT tile_id) = count(*)
       AND coalesce(bool_and(tile_id = ANY(%(tile_ids)s::integer[])), true)
FROM pg_temp.pggeolearn_chip_stage
