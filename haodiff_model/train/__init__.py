"""Trainers: shard streaming, distributed setup, checkpoint state, the shared loop pieces and the two stages."""
