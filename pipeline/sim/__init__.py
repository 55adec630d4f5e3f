"""The Meta-World adapter: tasks and instructions, rendering, scripted experts, collection."""
