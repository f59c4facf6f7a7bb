"""The `pdserve` command (main.py): up, demo, generate, and the planner's plan."""
