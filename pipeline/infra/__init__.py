"""Running the pipeline beyond one process: a local service stack and job submission to a Ray cluster."""
