"""The control plane's side of its agents: dispatch through long-polls, ingest of their
records, heartbeats, evaluations and who each agent is."""
