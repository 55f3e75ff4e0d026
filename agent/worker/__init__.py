"""The code that runs inside a run-worker process, never in the agent: loading a code
location (code_location.py), executing a job's steps (executors/), evaluating schedules
and sensors (evaluation.py), writing records to the agent (records.py), marking each
step's output (capture.py) and keeping outputs (outputs.py). `main.py` is its entry:
`python -m agent.worker MODE`, or forked by the agent's fork server.

It imports of the agent only the job SDK (`agent.sdk`) and the process helpers it
shares with the agent (`agent.processes`); nothing here reaches the agent's state.
"""
