"""The front door (issue 18): the mistakes a new user makes get a clear message and
mosquitto's exit code, never a traceback; seeds that cannot be reached are named; the
mosquitto_pub/sub flags work against a real node (and, where it matters, a real Mosquitto)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    NodeProcess,
    Subscriber,
    free_port,
    make_certs,
    publish_until_exit,
    stop_all,
    wait_until,
    zmesh_cli,
    zmesh_popen,
)
from zmesh import Node

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("frontdoor")
    certs = make_certs(workdir / "certs", ["solo"])
    started: list[NodeProcess] = []
    try:
        started.append(NodeProcess(workdir, "solo", certs))
        yield started[0]
    finally:
        stop_all(started)


def _clean(result: subprocess.CompletedProcess[str]) -> str:
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    return text


# ------------------------------------------------------------------ user mistakes


def test_mistakes_get_one_error_line_and_mosquittos_exit_code(node: NodeProcess, tmp_path: Path) -> None:
    mqtt, mesh = str(node.mqtt_port), str(node.control_port)
    certs = Path(node.args[node.args.index("--cert") + 1]).parent
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * 1024 * 1024))
    cases: list[tuple[list[str], int, str]] = [
        # the mesh port by mistake: ZMTP is not MQTT
        (["peers", "-p", mesh], 1, f"127.0.0.1:{mesh}"),
        (["pub", "-p", mesh, "-t", "x", "-m", "y"], 1, "is this an MQTT port?"),
        (["sub", "-p", mesh, "-t", "x"], 1, "mesh.listen"),
        # nothing there / a host that does not resolve
        (["pub", "-p", str(free_port()), "-t", "x", "-m", "y"], 1, "connection refused"),
        (["pub", "-h", "no-such-host.invalid", "-t", "x", "-m", "y"], 1, "cannot resolve"),
        # a message over the node's packet limit, at QoS 1 (3.1.1: the node closes) and MQTT 5
        (["pub", "-p", mqtt, "-t", "x", "-f", str(big), "-q", "1"], 1, "mqtt.max_packet_size"),
        (["pub", "-p", mqtt, "-t", "x", "-f", str(big), "-V", "mqttv5"], 1, "maximum packet size"),
        # topics checked locally, as mosquitto_pub/sub do
        (["pub", "-p", mqtt, "-t", "bad/#", "-m", "x"], 1, "Invalid publish topic 'bad/#'"),
        (["pub", "-p", mqtt, "-t", "", "-m", "x"], 1, "Invalid publish topic ''"),
        (["sub", "-p", mqtt, "-t", "bad/#/x"], 1, "Invalid subscription topic 'bad/#/x'"),
        # -h is the host
        (["pub", "-h"], 1, "-h is the host"),
        (["pub", "-p", mqtt, "-t", "x"], 1, "give exactly one of -m, -f, -s, -l, -n"),
        (["pub", "-p", mqtt, "-t", "x", "-f", str(tmp_path / "missing")], 1, "No such file"),
        (["pub", "-p", mqtt, "-t", "x", "-m", "y", "-V", "mqttv4"], 1, "unknown protocol version"),
        (["pub", "-p", mqtt, "-t", "x", "-m", "y", "-D", "publish", "content-type", "t"], 1, "need MQTT 5"),
        (["sub", "-p", mqtt, "-t", "x", "-c"], 1, "-c needs a client id"),
        (["wait", "-p", str(free_port()), "-W", "0.5"], 27, "not ready within 0.5 s"),
        # node run: the flag and the config key named, and the real cause
        (["node", "run", "--name", "x", "--cert", str(certs / "solo.key_secret"),
          "--listen", "10.9.9.9:7100", "--mqtt", ""], 1, "mesh.listen 10.9.9.9:7100 (--listen): 10.9.9.9 is not an address of this host"),
        (["node", "run", "--name", "x", "--cert", str(certs / "solo.key_secret"),
          "--listen", "127.0.0.1:0", "--mqtt", f"127.0.0.1:{mqtt}"], 1, f"mqtt.listen 127.0.0.1:{mqtt} (--mqtt): the port is in use"),
        (["node", "run", "--name", "x", "--cert", str(certs / "solo.key_secret"),
          "--listen", f"127.0.0.1:{mesh}", "--mqtt", ""], 1, f"mesh.listen 127.0.0.1:{mesh} (--listen): the port is in use"),
        (["node", "run", "--name", "x", "--cert", str(certs / "solo.key_secret"),
          "--trusted", str(tmp_path / "nowhere")], 2, "--trusted / mesh.trusted"),
        (["node", "run", "--name", "x", "--cert", str(certs / "solo.key")], 2,
         "a public key; a node needs its secret certificate, use"),
    ]
    for args, code, message in cases:
        result = zmesh_cli(*args, timeout=30)
        text = _clean(result)
        assert result.returncode == code, (args, result.returncode, text)
        assert message in text, (args, text)
        assert text.count("Error:") == 1, (args, text)
        assert "WARNING" not in text, (args, text)  # e.g. no chmod warning before "use NAME.key_secret"


def test_bind_problem_names_the_default_key() -> None:
    from zmesh.cli.daemon import bind_problem

    text = bind_problem("mqtt.listen", "--mqtt", "127.0.0.1:1883", errno.EADDRINUSE, default=True)
    assert text.startswith("the default mqtt.listen 127.0.0.1:1883 (--mqtt): the port is in use"), text
    assert "Mosquitto" in text
    assert "free?" not in bind_problem("mesh.listen", "--listen", "10.0.0.1:7100", errno.EADDRNOTAVAIL, default=False)


def test_a_refused_connection_exits_with_the_connack_code_like_mosquitto(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["locked"])
    (tmp_path / "passwd").write_text("")
    started: list[NodeProcess] = []
    try:
        locked = NodeProcess(tmp_path, "locked", certs, extra=["--config", str(_config(tmp_path))])
        started.append(locked)
        v3 = zmesh_cli("pub", "-p", str(locked.mqtt_port), "-t", "x", "-m", "y")
        assert v3.returncode == 5, _clean(v3)  # mosquitto_pub: 5, "not authorised"
        assert "not authorised" in v3.stderr
        v5 = zmesh_cli("sub", "-p", str(locked.mqtt_port), "-t", "x", "-V", "mqttv5")
        assert v5.returncode == 135, _clean(v5)  # 0x87, as mosquitto_sub -V mqttv5 returns
    finally:
        stop_all(started)


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "locked.toml"
    path.write_text('[mqtt]\nallow_anonymous = false\npassword_file = "passwd"\n')
    return path


def test_help_lines_and_version() -> None:
    assert zmesh_cli("--version").stdout.strip().startswith("zmesh ")
    assert zmesh_cli("version").stdout.strip() == zmesh_cli("--version").stdout.strip()
    for command in (["pub"], ["sub"], ["wait"]):
        result = zmesh_cli(*command, "--help")
        assert result.returncode == 0, result.stderr
        for line in result.stdout.splitlines():
            assert "<bool>" not in line and "<str>" not in line, line
        for flag in ("-d", "-k", "-c", "-x", "-L", "-V", "--will-topic", "-D", "--cafile", "--insecure"):
            assert re.search(rf"(^|\s){re.escape(flag)}[ ,]", result.stdout), (command, flag)
    pub_help = zmesh_cli("pub", "--help").stdout
    assert "--repeat" in pub_help and "--repeat-delay" in pub_help and re.search(r"\s-l[ ,]", pub_help)
    sub_help = zmesh_cli("sub", "--help").stdout
    for flag in ("-R", "-N", "-F"):
        assert re.search(rf"\s{flag}[ ,]", sub_help), flag


def test_every_command_and_option_has_a_help_line_without_type_noise() -> None:
    import click
    import typer

    from zmesh.cli.app import app

    def walk(command: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
        yield path, command
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])

    seen = 0
    for path, command in walk(typer.main.get_command(app), ["zmesh"]):
        if command.hidden:
            continue
        seen += 1
        ctx = click.Context(command, info_name=" ".join(path))
        assert command.help or command.short_help or path == ["zmesh"], path
        for param in command.get_params(ctx):
            if type(param).__name__.endswith("Option") and not getattr(param, "hidden", False):
                assert param.help, (path, param.opts)
        text = command.get_help(ctx)
        assert not re.search(r"<(str|bool|int|float|path|list\[)", text), (path, text)
    assert seen > 20
    group = zmesh_cli("node", "--help").stdout
    assert "a group" in group and "run" in group and "reload" in group
    assert "--ready-file" in zmesh_cli("node", "run", "--help").stdout


# ------------------------------------------------------------------ flags against a node


def _prefix() -> str:
    return f"f{uuid.uuid4().hex[:8]}"


def test_pub_dash_l_sends_each_line_and_repeat_sends_copies(node: NodeProcess) -> None:
    p = _prefix()
    with Subscriber(node.mqtt_port, f"{p}/#", qos=1) as sub:
        lines = subprocess.run(
            [sys.executable, "-m", "zmesh", "pub", "-p", str(node.mqtt_port), "-t", f"{p}/lines", "-l", "-q", "1"],
            input=b"one\n\ntwo\nthree\n", capture_output=True, timeout=30, cwd=REPO)
        assert lines.returncode == 0, lines.stderr
        assert [sub.get().payload for _ in range(3)] == [b"one", b"two", b"three"]  # blank not sent
        repeat = zmesh_cli("pub", "-p", str(node.mqtt_port), "-t", f"{p}/r", "-m", "again", "--repeat", "3",
                           "--repeat-delay", "0.05", "-q", "1")
        assert repeat.returncode == 0, repeat.stderr
        assert [sub.get().payload for _ in range(3)] == [b"again"] * 3


def test_pub_will_debug_url_and_mqtt5_properties(node: NodeProcess) -> None:
    p = _prefix()
    import paho.mqtt.client as mqtt

    with Subscriber(node.mqtt_port, f"{p}/#", qos=1, protocol=mqtt.MQTTv5) as sub:
        result = zmesh_cli("pub", "-L", f"mqtt://127.0.0.1:{node.mqtt_port}/{p}/url", "-m", "via url", "-d",
                           "-V", "mqttv5", "-q", "1", "-D", "publish", "user-property", "k", "v",
                           "-D", "publish", "content-type", "text/plain")
        assert result.returncode == 0, result.stderr
        assert "sending CONNECT" in result.stdout and "received PUBACK" in result.stdout, result.stdout
        message = sub.get()
        assert (message.topic, message.payload) == (f"{p}/url", b"via url")
        assert message.properties.ContentType == "text/plain"
        assert ("k", "v") in message.properties.UserProperty
        # A will: a sub killed without DISCONNECT has it published.
        holder = zmesh_popen("sub", "-p", str(node.mqtt_port), "-t", f"{p}/nothing", "-k", "5", "-d",
                             "--will-topic", f"{p}/will", "--will-payload", "gone", "--will-qos", "1")
        try:
            assert holder.stdout is not None
            deadline = time.monotonic() + 15
            while "received SUBACK" not in holder.stdout.readline():  # -d: it is connected
                assert holder.poll() is None and time.monotonic() < deadline, "the will holder did not subscribe"
        finally:
            holder.kill()
            holder.communicate(timeout=5)
        will = sub.get(timeout=15)
        assert (will.topic, will.payload) == (f"{p}/will", b"gone")


def test_sub_formats_skips_retained_and_persists_its_session(node: NodeProcess) -> None:
    p = _prefix()
    retained = zmesh_cli("pub", "-p", str(node.mqtt_port), "-t", f"{p}/old", "-m", "stale", "-r", "-q", "1")
    assert retained.returncode == 0, retained.stderr
    sub = zmesh_popen("sub", "-p", str(node.mqtt_port), "-t", f"{p}/#", "-R", "-C", "1",
                      "-F", r"%t|%p|%q|%r|%l\t%x", "-q", "1")

    def publish(attempt: int) -> None:
        zmesh_cli("pub", "-p", str(node.mqtt_port), "-t", f"{p}/new", "-m", "hi", "-q", "1")

    out, err = publish_until_exit(sub, publish)
    assert sub.returncode == 0, err
    assert out == f"{p}/new|hi|1|0|2\t6869\n", out  # -R: the retained 'stale' is not printed
    # -c -i: a persistent session queues QoS 1 messages while the client is away.
    client_id = f"persist-{p}"
    first = zmesh_cli("sub", "-p", str(node.mqtt_port), "-t", f"{p}/queued", "-q", "1", "-c", "-i", client_id, "-E")
    assert first.returncode == 0, first.stderr
    sent = zmesh_cli("pub", "-p", str(node.mqtt_port), "-t", f"{p}/queued", "-m", "while away", "-q", "1")
    assert sent.returncode == 0, sent.stderr
    back = zmesh_cli("sub", "-p", str(node.mqtt_port), "-t", f"{p}/queued", "-q", "1", "-c", "-i", client_id,
                     "-C", "1", "-W", "10")
    assert back.returncode == 0, back.stderr
    assert back.stdout == "while away\n"


# ------------------------------------------------------------------ reconnect


def test_sub_and_jobs_work_survive_their_nodes_restart(tmp_path: Path) -> None:
    """A worker and a subscriber beside a sidecar node: the node restarts on the same port,
    and both carry on (reconnect with backoff, subscribe again) instead of exiting."""
    certs = make_certs(tmp_path / "certs", ["side"])
    mqtt_port = free_port()
    started: list[NodeProcess] = []

    def start() -> NodeProcess:
        n = NodeProcess(tmp_path, "side", certs, extra=["--mqtt", f"127.0.0.1:{mqtt_port}"])
        started.append(n)
        return n

    def clients(n: NodeProcess) -> int:
        return int(n.sys_value("$SYS/zmesh/node")["mqtt"]["clients"])  # the reader counts too

    side = start()
    sub_out, sub_err, work_err = (open(tmp_path / name, "w+") for name in ("sub.out", "sub.err", "work.err"))
    sub = subprocess.Popen([sys.executable, "-m", "zmesh", "sub", "-p", str(mqtt_port), "-t", "restart/#", "-q", "1"],
                           stdout=sub_out, stderr=sub_err, cwd=REPO)
    worker = subprocess.Popen([sys.executable, "-m", "zmesh", "jobs", "work", "rq", "-p", str(mqtt_port), "-C", "1",
                               "--", sys.executable, "-c", "import sys; print('did', sys.stdin.read())"],
                              stdout=subprocess.PIPE, stderr=work_err, text=True, cwd=REPO)

    def printed(text: str) -> bool:
        return text in (tmp_path / "sub.out").read_text()

    def probe_until_printed(payload: str) -> None:
        def arrived() -> bool:
            zmesh_cli("pub", "-p", str(mqtt_port), "-t", "restart/x", "-m", payload, "-q", "1")
            return printed(payload)
        wait_until(arrived, 20, f"zmesh sub to print {payload!r}")

    try:
        probe_until_printed("before")
        wait_until(lambda: clients(side) >= 3, 10, "the worker to connect")
        side.stop()
        side = start()  # the same MQTT port: the sidecar restarted
        probe_until_printed("after")
        wait_until(lambda: "reconnected" in (tmp_path / "work.err").read_text(), 20, "the worker to reconnect")
        job = zmesh_cli("jobs", "submit", "rq", "-m", "x", "--wait", "-W", "20", "-p", str(mqtt_port))
        assert job.returncode == 0, job.stderr
        assert job.stdout.strip() == "did x"
        worker.communicate(timeout=20)
        assert worker.returncode == 0, (tmp_path / "work.err").read_text()
        sub.send_signal(signal.SIGINT)
        sub.wait(10)
        assert sub.returncode == 0
        for name in ("sub.err", "work.err"):
            text = (tmp_path / name).read_text()
            assert "connection lost" in text and "Traceback" not in text, (name, text)
    finally:
        for process in (sub, worker):
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=5)
        for f in (sub_out, sub_err, work_err):
            f.close()
        stop_all(started)


# ------------------------------------------------------------------ seeds


def test_a_node_warns_about_a_seed_that_is_down(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["lonely"])
    dead = free_port()
    started: list[NodeProcess] = []
    try:
        n = NodeProcess(tmp_path, "lonely", certs, seeds=[dead])
        started.append(n)
        wait_until(lambda: f"seed 127.0.0.1:{dead} is down or unreachable" in n.output(), 15,
                   "the warning about the dead seed")
        assert "connection refused" in n.output()
    finally:
        stop_all(started)


def test_a_node_warns_about_a_seed_that_does_not_trust_it(tmp_path: Path) -> None:
    mine = make_certs(tmp_path / "mine", ["stranger", "host"])
    theirs = make_certs(tmp_path / "theirs", ["host2"])
    # host runs with its own dir (it does not know stranger); stranger trusts host's key.
    (theirs / "host.key").write_bytes((mine / "host.key").read_bytes())
    (theirs / "host.key_secret").write_bytes((mine / "host.key_secret").read_bytes())
    (theirs / "host.key_secret").chmod(0o600)
    (mine / "host.key_secret").unlink()
    started: list[NodeProcess] = []
    try:
        host = NodeProcess(tmp_path, "host", theirs)
        started.append(host)
        stranger = NodeProcess(tmp_path, "stranger", mine, seeds=[host.control_port])
        started.append(stranger)
        wait_until(lambda: "no CURVE handshake with any of our 1 trusted keys" in stranger.output(), 15,
                   "the warning about the seed that does not trust us")
        assert f"seed 127.0.0.1:{host.control_port}" in stranger.output()
    finally:
        stop_all(started)


def test_wait_for_peers_says_the_seed_has_our_own_key(tmp_path: Path) -> None:
    """The README's old Python example: alpha's certificate, seeded at alpha."""
    certs = make_certs(tmp_path / "certs", ["alpha", "beta"])
    started: list[NodeProcess] = []
    try:
        alpha = NodeProcess(tmp_path, "alpha", certs)
        started.append(alpha)

        async def main() -> str:
            async with Node(name="embedded", cert=certs / "alpha.key_secret", trusted=certs,
                            listen="127.0.0.1:0", peers=[f"127.0.0.1:{alpha.control_port}"], mqtt=None) as n:
                with pytest.raises(TimeoutError) as raised:
                    await n.wait_for_peers(1, timeout=2)
                return str(raised.value)

        message = asyncio.run(main())
        assert f"seed 127.0.0.1:{alpha.control_port} answers with our own key" in message, message
        assert message.startswith("no peer up after 2 s")
    finally:
        stop_all(started)


def test_wait_for_peers_names_a_seed_that_is_down(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["a", "b"])
    dead = free_port()

    async def main() -> str:
        async with Node(name="a", cert=certs / "a.key_secret", trusted=certs, listen="127.0.0.1:0",
                        peers=[f"127.0.0.1:{dead}"], mqtt=None) as n:
            with pytest.raises(TimeoutError) as raised:
                await n.wait_for_peers(1, timeout=1)
            return str(raised.value)

    message = asyncio.run(main())
    assert f"seed 127.0.0.1:{dead} is down or unreachable (connection refused)" in message, message


def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    with open(log, "w") as out:
        demo = subprocess.Popen([sys.executable, "-m", "zmesh", "demo"], stdout=out, stderr=subprocess.STDOUT,
                                text=True, cwd=REPO)
    try:
        wait_until(lambda: "tick 1" in log.read_text() or demo.poll() is not None, 40, "the demo's first tick")
        demo.send_signal(signal.SIGINT)
        demo.wait(30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(5)
    text = log.read_text()
    assert demo.returncode == 0, text
    assert "Traceback" not in text and "exception was never retrieved" not in text, text
    assert "(try " not in text, text
    assert "nodes stopped" in text, text


def test_pub_and_sub_talk_to_the_nodes_tls_and_websocket_listeners(tmp_path: Path) -> None:
    """zmesh's own CLI reaches every listener kind a node serves: mqtts with a client
    certificate, ws, and wss (the flags mosquitto_pub/sub take, plus --ws / -L ws://)."""
    from tests.tls_certs import issue, make_ca

    ca = make_ca(tmp_path)
    server = issue(ca, tmp_path, "localhost", server=True, file_stem="server")
    alice = issue(ca, tmp_path, "alice")
    tls = f'certfile = "{server.cert}"\nkeyfile = "{server.key}"\n'
    config = tmp_path / "node.toml"
    config.write_text(
        '[[mqtt.listeners]]\naddress = "127.0.0.1:0"\n' + tls + f'cafile = "{ca.cert}"\nrequire_certificate = true\n\n'
        + '[[mqtt.listeners]]\naddress = "127.0.0.1:0"\nprotocol = "websockets"\n\n'
        + '[[mqtt.listeners]]\naddress = "127.0.0.1:0"\nprotocol = "websockets"\n' + tls)
    certs = make_certs(tmp_path / "certs", ["tls"])
    started: list[NodeProcess] = []
    try:
        n = NodeProcess(tmp_path, "tls", certs, extra=["--config", str(config)])
        started.append(n)
        ports = {e["scheme"]: e["port"] for e in json.loads(n.ready_file.read_text())["mqtt_listeners"]}
        p = _prefix()
        with Subscriber(n.mqtt_port, f"{p}/#", qos=1) as sub:
            ways = {
                "mqtts": ["-p", str(ports["mqtts"]), "--cafile", str(ca.cert), "--cert", str(alice.cert),
                          "--key", str(alice.key)],
                "ws": ["--ws", "-p", str(ports["ws"])],
                "wss": ["-L", f"wss://localhost:{ports['wss']}/{p}/wss", "--cafile", str(ca.cert)],
            }
            for scheme, flags in ways.items():
                topic = [] if scheme == "wss" else ["-t", f"{p}/{scheme}"]
                result = zmesh_cli("pub", *flags, *topic, "-m", scheme, "-q", "1")
                assert result.returncode == 0, (scheme, result.stderr)
                message = sub.get()
                assert (message.topic, message.payload) == (f"{p}/{scheme}", scheme.encode())
            # sub over wss, and a certificate refused: one error line naming the server.
            got = zmesh_popen("sub", "-L", f"wss://localhost:{ports['wss']}/{p}/back", "--cafile", str(ca.cert),
                              "-C", "1", "-W", "20", "-q", "1")
            out, err = publish_until_exit(got, lambda i: zmesh_cli(
                "pub", "-p", str(n.mqtt_port), "-t", f"{p}/back", "-m", "over wss", "-q", "1"))
            assert got.returncode == 0, err
            assert out == "over wss\n"
            bad = zmesh_cli("pub", "-p", str(ports["mqtts"]), "-t", "x", "-m", "y")  # no --cafile: not TLS
            text = _clean(bad)
            assert bad.returncode == 1 and f"127.0.0.1:{ports['mqtts']}" in text, text
            unverified = zmesh_cli("pub", "-p", str(ports["wss"]), "--ws", "--tls-use-os-certs", "-t", "x", "-m", "y")
            text = _clean(unverified)
            assert unverified.returncode == 1 and "certificate verify failed" in text.lower(), text
    finally:
        stop_all(started)


# ------------------------------------------------------------------ jobs


def test_jobs_result_fetches_a_finished_jobs_outcome_later(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["jobs"])
    config = tmp_path / "jobs.toml"
    config.write_text("[jobs]\nmax_attempts = 3\n")
    started: list[NodeProcess] = []
    try:
        n = NodeProcess(tmp_path, "jobs", certs, extra=["--config", str(config)])
        started.append(n)
        port = str(n.mqtt_port)
        submitted = zmesh_cli("jobs", "submit", "later", "-m", "payload", "-p", port)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        worker = subprocess.run(
            [sys.executable, "-m", "zmesh", "jobs", "work", "later", "-p", port, "-C", "1", "--",
             sys.executable, "-c", "import sys; print('got', sys.stdin.read())"],
            capture_output=True, text=True, timeout=30, cwd=REPO)
        assert worker.returncode == 0, worker.stderr
        result = zmesh_cli("jobs", "result", job_id, "-p", port, "-W", "10")
        assert (result.returncode, result.stdout) == (0, "got payload\n"), result.stderr
        unknown = zmesh_cli("jobs", "result", "no-such-job", "-p", port, "-W", "1")
        assert unknown.returncode == 27 and "no result for job no-such-job" in _clean(unknown), unknown.stderr

        # A job that fails every time: retried with backoff (0.5 s, then 1 s), then dead.
        failing = zmesh_popen("jobs", "work", "broken", "-p", port, "--", sys.executable, "-c", "raise SystemExit(3)")
        try:
            started_at = time.monotonic()
            dead = zmesh_cli("jobs", "submit", "broken", "-m", "x", "--wait", "-W", "30", "-p", port)
            took = time.monotonic() - started_at
        finally:
            failing.kill()
            failing.communicate(timeout=5)
        assert dead.returncode == 1, _clean(dead)
        assert "after 3 attempts" in dead.stderr, dead.stderr
        assert took >= 1.5, took  # 0.5 s + 1 s of backoff between the three attempts
        stats = zmesh_cli("jobs", "stats", "-p", port)
        header = stats.stdout.splitlines()[0].split()
        assert header[:3] == ["QUEUE", "WORKERS", "DEPTH"], stats.stdout
    finally:
        stop_all(started)


def test_doctor_beside_its_running_node_says_the_ports_are_its_own(node: NodeProcess, tmp_path: Path) -> None:
    certs = Path(node.args[node.args.index("--cert") + 1]).parent
    flags = ["--name", "solo", "--cert", str(certs / "solo.key_secret"),
             "--listen", f"127.0.0.1:{node.control_port}", "--mqtt", f"127.0.0.1:{node.mqtt_port}"]
    result = zmesh_cli("doctor", *flags)
    text = _clean(result)
    assert result.returncode == 0, text
    assert f"mesh control 127.0.0.1:{node.control_port}: in use by this node, running with this certificate" in text
    assert f"127.0.0.1:{node.mqtt_port}: in use by node solo, running with this certificate" in text
    # Another node's certificate: the ports are someone else's, and doctor fails as before.
    other = make_certs(tmp_path / "other", ["other"])
    result = zmesh_cli("doctor", "--name", "other", "--cert", str(other / "other.key_secret"),
                       *flags[4:])
    text = _clean(result)
    assert result.returncode == 1 and "cannot bind" in text and "in use by" not in text, text


def test_a_peer_that_left_is_forgotten_after_a_while_and_peers_says_so(tmp_path: Path) -> None:
    """12 peer expiries after it went down, a peer that is not a seed leaves `zmesh peers`."""
    certs = make_certs(tmp_path / "certs", ["a", "b", "c"])
    config = tmp_path / "fast.toml"
    config.write_text("[mesh]\nheartbeat_interval = 0.1\npeer_expiry = 0.5\n")  # forgotten after 6 s
    started: list[NodeProcess] = []
    try:
        a = NodeProcess(tmp_path, "a", certs, extra=["--config", str(config)])
        started.append(a)
        b = NodeProcess(tmp_path, "b", certs, seeds=[a.control_port], extra=["--config", str(config)])
        started.append(b)
        c = NodeProcess(tmp_path, "c", certs, seeds=[a.control_port], extra=["--config", str(config)])
        started.append(c)
        wait_until(lambda: b.peers_up() >= {"a", "c"}, 15, "b to see a and c")
        c.kill()
        wait_until(lambda: "c" not in b.peers_up(), 10, "c to go down at b")
        names = lambda: {p["name"] for p in b.sys_value("$SYS/zmesh/peers")}  # noqa: E731
        assert "c" in names()  # down, still listed
        wait_until(lambda: "c" not in names(), 20, "b to forget c")
        assert "peer c forgotten" in b.output()
        listed = zmesh_cli("peers", "-p", str(b.mqtt_port))
        assert listed.returncode == 0 and "\nc " not in listed.stdout and "\na " in listed.stdout, listed.stdout
    finally:
        stop_all(started)


def test_sub_output_is_byte_for_byte_mosquitto_subs(tmp_path: Path) -> None:
    """The same retained message, printed by mosquitto_sub and by zmesh sub, from one real
    Mosquitto broker: -v, -F (with -N, escapes, hex), and exit codes for -W."""
    from tests.mosquitto_broker import HAVE_MOSQUITTO, HAVE_MOSQUITTO_CLIENTS, MosquittoBroker

    if not (HAVE_MOSQUITTO and HAVE_MOSQUITTO_CLIENTS):
        pytest.skip("needs Debian's mosquitto and mosquitto-clients")
    with MosquittoBroker(tmp_path) as broker:
        port = str(broker.port)
        subprocess.run(["mosquitto_pub", "-p", port, "-t", "cmp/t", "-m", "hé\tllo", "-r", "-q", "1"], check=True, timeout=10)
        for flags in (["-v"], ["-F", r"%t|%p|%q|%r|%l|%x|%X|%%\n"], ["-F", "%t %p", "-N"], ["-R", "-W", "1"]):
            args = ["-p", port, "-t", "cmp/#", "-C", "1", *flags]
            theirs = subprocess.run(["mosquitto_sub", *args], capture_output=True, timeout=15)
            ours = subprocess.run([sys.executable, "-m", "zmesh", "sub", *args], capture_output=True, timeout=15, cwd=REPO)
            assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), (flags, theirs, ours)
        json_theirs = subprocess.run(["mosquitto_sub", "-p", port, "-t", "cmp/#", "-C", "1", "-F", "%j"],
                                     capture_output=True, timeout=15).stdout
        json_ours = subprocess.run([sys.executable, "-m", "zmesh", "sub", "-p", port, "-t", "cmp/#", "-C", "1", "-F", "%j"],
                                   capture_output=True, timeout=15, cwd=REPO).stdout
        theirs_fields, ours_fields = json.loads(json_theirs), json.loads(json_ours)
        assert theirs_fields.keys() == ours_fields.keys()
        assert {k: v for k, v in ours_fields.items() if k != "tst"} == {k: v for k, v in theirs_fields.items() if k != "tst"}
        assert len(ours_fields["tst"]) == len(theirs_fields["tst"])


def test_peers_says_when_the_acl_hides_sys_instead_of_timing_out(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", ["hidden"])
    (tmp_path / "acl").write_text("topic read public/#\n")
    config = tmp_path / "acl.toml"
    config.write_text('[mqtt]\nacl_file = "acl"\n')
    started: list[NodeProcess] = []
    try:
        n = NodeProcess(tmp_path, "hidden", certs, extra=["--config", str(config)])
        started.append(n)
        began = time.monotonic()
        result = zmesh_cli("peers", "-p", str(n.mqtt_port))
        text = _clean(result)
        assert result.returncode == 1, text
        assert "ACL" in text and "hides $SYS from anonymous clients" in text and "topic read $SYS/zmesh/#" in text, text
        assert time.monotonic() - began < 9  # said at once (3 s), not after the old 10 s and exit 27
    finally:
        stop_all(started)
