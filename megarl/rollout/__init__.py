"""Rollout data handling that needs no engine: grouping, filtering, reward shaping."""
