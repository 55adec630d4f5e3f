"""MLflow: stage runs, the registered pyfunc, and promotion through the model registry."""
