"""Prefect orchestration over the regdpo library; deployments in prefect.yaml.

    flows.py      the stage flows (made from the stage registry), the DAG, the work-item flow
    params.py     parameter types and descriptions for the UI form
    artifacts.py  what a run shows in the UI (summaries, rejects, training curves, the report)
    logs.py       the library's log lines in run logs; no progress bars off a terminal
    forksafe.py   forked children of a flow-run process exit cleanly (Prefect 3.8.8 workaround)
    server.py     the temporary server of `regdpo run` (own session, own database, start-up timeout)
    serve.py      `regdpo serve`: server, pools, a supervised worker per pool
    slots.py      GPU slots a dead holder cannot keep; waits that say so and end
    deploy.py     `regdpo deploy`
    steps.py      prefect.yaml's pull step (finds the project directory on a worker)
    lifetime.py   helper processes that die with their parent, kill -9 included

Importing this package does not import prefect; `pipelines.flows` (and the modules it uses) do.
"""
