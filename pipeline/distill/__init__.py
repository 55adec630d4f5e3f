"""Training plane: DeepSpeed engines on Ray Train workers, the ActDistill losses, stage-1 probing."""
