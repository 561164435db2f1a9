"""Feature definitions shared by training and serving: reading data, ids, splits, ranking.

Everything a model input depends on is defined here exactly once, so the offline evaluation and
the online server cannot drift apart (training/serving skew).
"""
