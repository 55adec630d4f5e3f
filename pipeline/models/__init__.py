"""The VLA, its router, the graph probes, student derivation, checkpoints and backbone import."""
