"""The self-contained offline HTML report assembled from results and figures."""
