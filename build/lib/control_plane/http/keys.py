"""The services a control-plane app holds, one typed key each (`build_app` sets them).

Handlers take what they use from `request.app[KEY]`: a handler's imports say which
services it touches, and no object holds them all.
"""

from __future__ import annotations

from aiohttp import web

from control_plane.bus import WakeBus
from control_plane.clock import Clock
from control_plane.config import ControlPlaneConfig
from control_plane.daemon.health import DaemonHealth
from control_plane.daemon.leadership import LeaderElector
from control_plane.daemon.run_queue import RunQueue
from control_plane.fleet.dispatch import Dispatcher
from control_plane.fleet.evaluations import EvaluationBroker
from control_plane.fleet.heartbeats import HeartbeatRecorder
from control_plane.fleet.identity import AgentIdentities
from control_plane.http.auth import TokenVerifier
from control_plane.metrics import Metrics
from control_plane.model.submission import RunRules
from control_plane.storage.port import Storage
from control_plane.waiters import KeyedWaiters
from protocol.codec import DecodeLimits

CONFIG = web.AppKey("config", ControlPlaneConfig)
STORAGE = web.AppKey("storage", Storage)
CLOCK = web.AppKey("clock", Clock)
BUS = web.AppKey("bus", WakeBus)
METRICS = web.AppKey("metrics", Metrics)
HEALTH = web.AppKey("health", DaemonHealth)
ELECTOR = web.AppKey("elector", LeaderElector)
RUN_QUEUE = web.AppKey("run_queue", RunQueue)  # its dispatch passes, and /queue's plan
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
HEARTBEATS = web.AppKey("heartbeats", HeartbeatRecorder)
BROKER = web.AppKey("broker", EvaluationBroker)
IDENTITIES = web.AppKey("identities", AgentIdentities)
VERIFIER = web.AppKey("verifier", TokenVerifier)
RUN_WATCHERS = web.AppKey("run_watchers", KeyedWaiters)  # requests waiting on a run: RUN
RUN_RULES = web.AppKey("run_rules", RunRules)
DECODE_LIMITS = web.AppKey("decode_limits", DecodeLimits)
