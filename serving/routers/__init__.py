"""Thin HTTP routers; the work is done by the recommender held in application state."""
