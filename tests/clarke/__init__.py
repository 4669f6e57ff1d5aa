"""Clarke subgradients, the min-norm element and Goldstein stationarity profiles."""
