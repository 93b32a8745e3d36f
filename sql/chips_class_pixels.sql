-- Label pixels per class over the TRAIN chips (class_counts[k + 1] counts class k).
SELECT k - 1 AS class_id, sum(c.class_counts[k])::bigint AS pixels
FROM pggeolearn.chips AS c
CROSS JOIN LATERAL generate_subscripts(c.class_counts, 1) AS k
WHERE c.dataset = %(dataset)s AND c.split = 'train'
GROUP BY k
ORDER BY k
