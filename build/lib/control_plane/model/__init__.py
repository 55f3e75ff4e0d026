"""The domain: what a run, an agent, a lease or a verdict is, and the rules between them.

Plain values and pure functions only: nothing here reads storage, the clock or the
network. The daemon loops, the HTTP handlers and storage all speak these types, and the
decisions that are rules of the domain (which status may follow which, which record an
agent may write, what a new run must meet) live here, where they are tested as tables.
"""
