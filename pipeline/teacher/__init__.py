"""The teacher: behaviour cloning on expert trajectories, and stage-1 probing that labels every row."""
