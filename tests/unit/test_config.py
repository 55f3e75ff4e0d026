"""Config files: defaults, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_agent_config
from control_plane.config import load_control_plane_config
from protocol.schema import ConfigError


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_control_plane_defaults(tmp_path: Path) -> None:
    config = load_control_plane_config(write(tmp_path, "cp.toml", ""))
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8470)
    assert config.storage.url == f"sqlite:///{tmp_path}/fleetrun.db"
    assert config.run_coordinator.kind == "queued"
    assert config.run_coordinator.max_concurrent_runs == 10
    assert config.run_monitoring.agent_heartbeat_timeout_seconds == 30
    assert config.run_monitoring.start_timeout_seconds == 180
    assert config.run_retries.max_retries == 0
    assert config.auth.enabled is False


def test_control_plane_full_file(tmp_path: Path) -> None:
    config = load_control_plane_config(
        write(
            tmp_path,
            "cp.toml",
            """
[server]
host = "127.0.0.2"
port = 9000
[storage]
url = "sqlite:////var/tmp/x.db"
[run_coordinator]
kind = "default"
max_concurrent_runs = -1
[[run_coordinator.tag_concurrency_limits]]
key = "database"
value = "redshift"
limit = 2
[[run_coordinator.tag_concurrency_limits]]
key = "team"
per_unique_value = true
limit = 1
[run_monitoring]
agent_heartbeat_timeout_seconds = 10
max_runtime_seconds = 60
[run_retries]
max_retries = 3
retry_on_op_failure = false
[auth]
enabled = true
""",
        )
    )
    assert config.server.port == 9000
    assert config.storage.url == "sqlite:////var/tmp/x.db"
    limits = config.run_coordinator.tag_concurrency_limits
    assert (limits[0].key, limits[0].value, limits[0].limit) == ("database", "redshift", 2)
    assert limits[1].per_unique_value is True
    assert config.run_monitoring.agent_heartbeat_timeout_seconds == 10.0
    assert config.run_retries.retry_on_op_failure is False


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[server]\nprot = 1\n", "server.prot", "unknown key"),
        ("[serverr]\n", "serverr", "unknown key"),
        ('[server]\nport = "8470"\n', "server.port", "expected an integer"),
        (
            "[run_coordinator]\nmax_concurrent_runs = -2\n",
            "run_coordinator.max_concurrent_runs",
            ">= 0",
        ),
        ('[run_coordinator]\nkind = "fifo"\n', "run_coordinator.kind", "queued"),
        (
            '[[run_coordinator.tag_concurrency_limits]]\nkey = "a"\nlimit = "x"\n',
            "run_coordinator.tag_concurrency_limits[0].limit",
            "expected an integer",
        ),
        (
            "[[run_coordinator.tag_concurrency_limits]]\nlimit = 1\n",
            "run_coordinator.tag_concurrency_limits[0].key",
            "missing",
        ),
        ("[run_monitoring]\nenabled = 1\n", "run_monitoring.enabled", "expected a boolean"),
        (
            "[run_monitoring]\nterminate_grace_seconds = 0\n",
            "run_monitoring.terminate_grace_seconds",
            "> 0",
        ),
        ('[run_retries]\nbackoff = "fibonacci"\n', "run_retries.backoff", "exponential"),
        ("[run_retries]\ndelay_seconds = -1\n", "run_retries.delay_seconds", ">= 0"),
        ('[storage]\nurl = "mysql://x"\n', "storage.url", "unsupported"),
        ("[limits]\nmax_events_per_batch = 10\n", "limits.max_events_per_batch", ">= 500"),
        ("[limits]\nmax_body_bytes = 0\n", "limits.max_body_bytes", "> 0"),
        ("[limits]\nmax_msgpack_depth = 2\n", "limits.max_msgpack_depth", ">= 8"),
        ("[limits]\nmax_polls = 2\n", "limits.max_polls", "unknown key"),
        ('[server]\ntls_cert = "c.pem"\n', "server.tls_cert", "tls_key"),
    ],
)
def test_control_plane_errors_name_file_and_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, "control-plane.toml", text)
    with pytest.raises(ConfigError) as info:
        load_control_plane_config(path)
    message = str(info.value)
    assert path in message and repr(key) in message and problem in message


def test_every_problem_of_a_control_plane_file_is_named_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "control-plane.toml",
        """
[server]
prot = 1
port = "8470"
poll_timeout_seconds = 0
[run_coordinator]
kind = "fifo"
[[run_coordinator.tag_concurrency_limits]]
limit = "x"
[[run_coordinator.tag_concurrency_limits]]
key = "team"
limit = -1
[run_retries]
backoff = "fibonacci"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_control_plane_config(path)
    assert info.value.lines == tuple(
        f"{path}: key {key!r}: {reason}"
        for key, reason in [
            ("server.prot", "unknown key; did you mean port?"),
            ("server.port", "expected an integer, got a string"),
            ("server.poll_timeout_seconds", "must be in (0, 300]"),
            ("run_coordinator.tag_concurrency_limits[0].key", "required key is missing"),
            (
                "run_coordinator.tag_concurrency_limits[0].limit",
                "expected an integer, got a string",
            ),
            ("run_coordinator.tag_concurrency_limits[1].limit", "must be >= 0"),
            ("run_coordinator.kind", "must be 'queued' or 'default', not 'fifo'"),
            ("run_retries.backoff", "must be 'none', 'linear' or 'exponential', not 'fibonacci'"),
        ]
    )
    assert str(info.value) == "\n".join(info.value.lines)


def test_a_value_of_the_wrong_type_is_named_once(tmp_path: Path) -> None:
    """Its default stands in for the table's own checks, which do not name it again."""
    path = write(
        tmp_path, "cp.toml", '[limits]\nmax_events_per_batch = "x"\nmax_msgpack_depth = 0\n'
    )
    with pytest.raises(ConfigError) as info:
        load_control_plane_config(path)
    assert [line.split("'")[1] for line in info.value.lines] == [
        "limits.max_events_per_batch",
        "limits.max_msgpack_depth",
    ]


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "cp.toml", "[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_control_plane_config(path)


def test_agent_config_resolves_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "agent.toml",
        """
control_plane_url = "http://127.0.0.1:9"
name = "w1"
queues = ["default", "gpu"]
max_concurrent_runs = 2
[[code_locations]]
name = "etl"
python_file = "defs.py"
working_directory = "jobs"
[[code_locations]]
name = "pkg"
module = "my.defs"
""",
    )
    config = load_agent_config(path)
    assert config.queues == ["default", "gpu"]
    etl, pkg = config.code_locations
    assert etl.working_directory == str(tmp_path / "jobs")
    assert etl.python_file == str(tmp_path / "jobs" / "defs.py")
    assert pkg.module == "my.defs" and pkg.working_directory == str(tmp_path)


def test_agent_name_defaults_to_host_name(tmp_path: Path) -> None:
    import socket

    assert load_agent_config(write(tmp_path, "a.toml", "")).name == socket.gethostname()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('max_concurrent_runs = "4"\n', "max_concurrent_runs"),
        ("max_concurrent_runs = 0\n", "max_concurrent_runs"),
        ('queue = ["a"]\n', "queue"),
        ('[[code_locations]]\nname = "x"\n', "code_locations[0].python_file"),
        (
            '[[code_locations]]\nname = "x"\npython_file = "a"\nmodule = "b"\n',
            "code_locations[0].python_file",
        ),
        ('[[code_locations]]\nname = "x y"\nmodule = "b"\n', "code_locations[0].name"),
        ('control_plane_url = "ftp://x"\n', "control_plane_url"),
        ('run_launcher = "thread"\n', "run_launcher"),
        ('process_tracking = "systemd"\n', "process_tracking"),
        ('[output_store]\nkind = "s3"\n', "output_store.kind"),
        ('[output_store]\nkind = "filesystem"\n', "output_store.path"),
        ("[output_store]\nmax_output_bytes = 0\n", "output_store.max_output_bytes"),
        ('name = "a b"\n', "name"),
        ('ca_file = "ca.pem"\n', "ca_file"),
        # a token must not cross a network in clear text unless explicitly allowed
        ('token_file = "t"\ncontrol_plane_url = "http://10.0.0.5:8470"\n', "control_plane_url"),
    ],
)
def test_agent_errors_name_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, "agent.toml", text)
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    assert path in str(info.value) and repr(key) in str(info.value)


def test_every_problem_of_an_agent_file_is_named_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "agent.toml",
        """
queue = ["a"]
max_concurrent_runs = "4"
run_launcher = "thread"
queues = []
[[code_locations]]
name = "x y"
module = "b"
[[code_locations]]
python_file = "defs.py"
[[code_locations]]
name = "etl"
module = "a"
[[code_locations]]
name = "etl"
module = "b"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    keys = [
        "queue",
        "max_concurrent_runs",
        "code_locations[0].name",
        "code_locations[1].name",
        "run_launcher",
        "queues",
        "code_locations",
    ]
    assert [line.split("'")[1] for line in info.value.lines] == keys
    assert all(line.startswith(f"{path}: key ") for line in info.value.lines)
    assert "'etl' is used twice" in info.value.lines[-1]


def test_a_token_over_http_is_allowed_to_loopback_or_when_asked(tmp_path: Path) -> None:
    for text in (
        'token_file = "t"\ncontrol_plane_url = "http://127.0.0.1:8470"\n',
        'token_file = "t"\ncontrol_plane_url = "http://localhost:8470"\n',
        'token_file = "t"\ncontrol_plane_url = "https://cp.example.com"\n',
        'token_file = "t"\ncontrol_plane_url = "http://10.0.0.5:8470"\n'
        "allow_insecure_http = true\n",
    ):
        load_agent_config(write(tmp_path, "agent.toml", text))


def test_code_root_confines_code_locations(tmp_path: Path) -> None:
    root = tmp_path / "code"
    (root / "etl").mkdir(parents=True)
    (root / "etl" / "defs.py").write_text("")
    (tmp_path / "elsewhere.py").write_text("")
    (root / "etl" / "link.py").symlink_to(tmp_path / "elsewhere.py")
    base = 'code_root = "code"\n[[code_locations]]\nname = "etl"\n'
    ok = base + 'working_directory = "code/etl"\npython_file = "defs.py"\n'
    config = load_agent_config(write(tmp_path, "agent.toml", ok))
    assert config.code_root == str(root)
    for text, keys in (
        (
            base + 'working_directory = "."\npython_file = "code/etl/defs.py"\n',
            ["working_directory"],
        ),
        (
            base + 'working_directory = "code/etl"\npython_file = "../../elsewhere.py"\n',
            ["python_file"],
        ),
        (base + 'working_directory = "code/etl"\npython_file = "link.py"\n', ["python_file"]),
        (
            base + 'working_directory = ".."\npython_file = "x.py"\n',
            ["working_directory", "python_file"],
        ),
    ):
        path = write(tmp_path, "agent.toml", text)
        with pytest.raises(ConfigError) as info:
            load_agent_config(path)
        assert len(info.value.lines) == len(keys)
        for line, key in zip(info.value.lines, keys, strict=True):
            assert line.startswith(f"{path}: key 'code_locations[0].{key}': ")
            assert "is outside code_root" in line


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pa Zq9@h/db",
        "postgresql://u:pa/Zq9@h/db",
        "postgresql://u:pa?Zq9@h/db",
        "postgresql://u:pa#Zq9@h/db",
        "postgresql://u:p@Zq9@h/db",
        "postgresql://u:pa\tZq9@h/db",
        "mysql://u:pa/Zq9@h/db",
    ],
)
def test_a_password_parsers_would_cut_is_refused_unquoted(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, "control-plane.toml", f'[storage]\nurl = "{url}"\n')
    with pytest.raises(ConfigError, match="percent-encode") as info:
        load_control_plane_config(path)
    assert "Zq9" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pa%2Fss%40x@h1:5432,h2:5432/db?sslmode=require",
        "postgresql://u@h/db",
        "sqlite:////srv/my fleet@2026/fleetrun.db",
    ],
)
def test_encoded_passwords_and_odd_sqlite_paths_are_accepted(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, "control-plane.toml", f'[storage]\nurl = "{url}"\n')
    assert load_control_plane_config(path).storage.url == url
