"""The learning layer: data, partitioning, models and training, evaluation, the aggregation math
(strategies, FedAvg, privacy) and the run spec. May import the protocol layer.
"""
