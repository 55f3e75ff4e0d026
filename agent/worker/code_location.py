"""Loading a code location's `Definitions` (runs only inside run-worker processes)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from dataclasses import replace
from types import ModuleType

from agent.errors import AgentError
from agent.sdk import Definitions, RunStatusSensorDefinition, SensorDefinition
from protocol.messages import CodeLocationInfo, LocationSpec, ScheduleInfo, SensorInfo
from protocol.validation import location_problem


class LocationLoadError(AgentError):
    """The location's code could not be imported or defines no `Definitions`."""


def _import(spec: LocationSpec) -> ModuleType:
    if spec.working_directory:
        os.chdir(spec.working_directory)
        sys.path.insert(0, spec.working_directory)
    if spec.code_directory:  # this version's copy comes first: its modules win
        sys.path.insert(0, spec.code_directory)
    if spec.module is not None:
        return importlib.import_module(spec.module)
    assert spec.python_file is not None
    if not os.path.isfile(spec.python_file):
        raise LocationLoadError(f"python_file {spec.python_file} does not exist")
    module_name = os.path.splitext(os.path.basename(spec.python_file))[0]
    mod_spec = importlib.util.spec_from_file_location(module_name, spec.python_file)
    if mod_spec is None or mod_spec.loader is None:
        raise LocationLoadError(f"cannot load {spec.python_file} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[module_name] = module
    mod_spec.loader.exec_module(module)
    return module


def load_definitions(spec: LocationSpec) -> Definitions:
    """Import the location and return its single `Definitions` object. What the import
    raises is a load error, `sys.exit` included; a stop order's interruption (a
    BaseException of the worker's) is not, and goes through: the run was stopped, its
    code did not fail."""
    try:
        module = _import(spec)
    except LocationLoadError:
        raise
    except (Exception, SystemExit) as exc:
        detail = "".join(traceback.format_exception(exc))
        raise LocationLoadError(
            f"code location {spec.name!r} failed to import: {type(exc).__name__}: {exc}\n{detail}"
        ) from None
    found = [v for v in vars(module).values() if isinstance(v, Definitions)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise LocationLoadError(
            f"code location {spec.name!r} defines {what} Definitions objects; expected one"
        )
    return found[0]


def describe(spec: LocationSpec) -> CodeLocationInfo:
    try:
        defs = load_definitions(spec)
    except LocationLoadError as exc:
        return CodeLocationInfo(name=spec.name, error=str(exc))
    info = CodeLocationInfo(
        name=spec.name,
        version=spec.version,
        jobs=[j.to_info() for j in defs.jobs.values()],
        schedules=[
            ScheduleInfo(
                name=s.name,
                job=s.job.name,
                cron=s.cron,
                timezone=s.timezone,
                default_status=str(s.default_status),
                catchup=s.catchup,
                tags=dict(s.tags),
            )
            for s in defs.schedules.values()
        ],
        sensors=[_sensor_info(s) for s in defs.sensors.values()],
    )
    # What the control plane would refuse is this location's load error, so the
    # agent's other locations still register and serve.
    problem = location_problem(info)
    return info if problem is None else CodeLocationInfo(name=spec.name, error=problem)


def _sensor_info(sensor: SensorDefinition) -> SensorInfo:
    info = SensorInfo(
        name=sensor.name,
        job="" if sensor.job is None else sensor.job.name,
        minimum_interval_seconds=float(sensor.minimum_interval_seconds),
        default_status=str(sensor.default_status),
    )
    if not isinstance(sensor, RunStatusSensorDefinition):
        return info
    return replace(
        info,
        run_status=sensor.run_status,
        monitored_jobs=list(sensor.monitored_jobs),
        monitor_all_locations=sensor.monitor_all_code_locations,
    )
