"""Ray Tune: search spaces, the trial driver, and the compute/success frontier."""
