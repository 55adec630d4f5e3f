"""The training plane every trained stage shares: the DeepSpeed engine, the Ray Train driver, the step loop."""
