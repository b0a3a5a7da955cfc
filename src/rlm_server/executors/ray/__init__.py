"""The Ray executor: completions run on the nodes of a Ray cluster (executor.py, in the
server) through one node agent per node (agent.py, a Ray actor on that node)."""
