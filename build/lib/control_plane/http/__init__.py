"""The control plane's HTTP edge: the JSON API, the agent protocol, probes, metrics and
the web UI, wired by `app.build_app`. Handlers decode, check and call the domain."""
