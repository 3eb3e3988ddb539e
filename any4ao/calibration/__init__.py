"""One-sample activation statistics that weight the k-means objective."""
