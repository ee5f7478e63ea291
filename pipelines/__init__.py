"""Prefect orchestration over the regdpo library: flows in `pipelines.flows`, deployments in prefect.yaml.

Importing this package does not import prefect; `pipelines.flows` does.
"""
