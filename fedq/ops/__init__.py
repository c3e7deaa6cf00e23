"""Operating fedq: the dashboard, terminal views, Redis ACL users and the Kubernetes and
Kubeflow deployments. May import every layer below it.
"""
