"""The roles: the aggregator (an rq job), the client loop, `fedq run`, simulations, the processes
they start, what they report. May import the learning and protocol layers.
"""
