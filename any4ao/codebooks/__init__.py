"""How LUTs are chosen: fixed codebooks (int, nf4, fp4), group scaling and weighted k-means."""
