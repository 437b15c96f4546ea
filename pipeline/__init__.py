"""pipeline: the distributed, stateful side of ditscale (Ray, WebDataset, MLflow, file systems) and the CLI."""
