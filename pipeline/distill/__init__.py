"""Stage 2: the routed student's objective, the ActDistill losses, and fitting a student."""
