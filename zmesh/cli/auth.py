"""The users-and-ACLs commands of `zmesh`: `passwd`, `acl check`, `node reload`.

Registered on the main typer app by ``zmesh.cli``; kept here so that the main CLI module
does not grow with them. Heavy imports stay inside the commands (CLI start-up time).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated

import typer

CONTEXT = {"help_option_names": ["--help"]}
EXIT_ALLOWED, EXIT_DENIED, EXIT_BAD_FILE = 0, 1, 2


def _error(message: str, code: int) -> typer.Exit:
    typer.echo(message if message.startswith(("Error", "Warning")) else f"Error: {message}", err=True)
    return typer.Exit(code)


def passwd(
    args: Annotated[list[str] | None, typer.Argument(help="FILE USER [PASSWORD] (only FILE with -U).", show_default=False)] = None,
    create: Annotated[bool, typer.Option("-c", help="Create a new password file (overwrites an existing one).")] = False,
    batch: Annotated[bool, typer.Option("-b", help="Batch mode: the password is on the command line.")] = False,
    delete: Annotated[bool, typer.Option("-D", help="Delete the user.")] = False,
    update: Annotated[bool, typer.Option("-U", help="Hash every plaintext password in FILE.")] = False,
    scheme: Annotated[str | None, typer.Option("-H", help="sha512-pbkdf2 (default) or sha512.", show_default=False)] = None,
    iterations: Annotated[int | None, typer.Option("-I", help="PBKDF2 iterations (default 101).", show_default=False)] = None,
) -> None:
    """Manage a Mosquitto-format password file, like mosquitto_passwd (file mode 0600)."""
    import getpass

    from zmesh.cli.passwd import USAGE, PasswdError, parse_request, run

    if not args and not (create or batch or delete or update or scheme or iterations):
        typer.echo(USAGE)
        raise typer.Exit(1)
    try:
        request = parse_request(
            list(args or []), create=create, batch=batch, delete=delete, update=update,
            scheme=scheme, iterations=iterations,
        )
        run(request, getpass.getpass)
    except PasswdError as exc:
        if str(exc) == USAGE:
            typer.echo(USAGE)
            raise typer.Exit(1) from None
        raise _error(str(exc), 1) from None
    except (EOFError, KeyboardInterrupt):
        typer.echo("", err=True)
        raise typer.Exit(1) from None


def acl_check(
    args: Annotated[list[str], typer.Argument(help="USER TOPIC ACCESS (USER '-': anonymous; ACCESS: read, write or subscribe).", show_default=False)],
    client_id: Annotated[str, typer.Option("--client-id", "-i", help="Client id, for %c in patterns.")] = "",
    acl_file: Annotated[Path | None, typer.Option("--acl-file", help="The ACL file to check.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="A node config: its mqtt.acl_file.")] = None,
    anonymous: Annotated[bool, typer.Option("--anonymous", help="Check for a client without a username (then give TOPIC ACCESS only).")] = False,
) -> None:
    """Would this user be allowed? Prints "allowed" or "denied" and the deciding line.

    Exit 0 allowed, 1 denied, 2 a bad or missing file."""
    from zmesh.config import ConfigError, load_config
    from zmesh.security.acl import AclFile
    from zmesh.security.files import AuthFileError

    if len(args) != (2 if anonymous else 3):
        raise _error("give USER TOPIC ACCESS (or --anonymous TOPIC ACCESS)", EXIT_BAD_FILE)
    user: str | None
    if anonymous:
        user, topic, access = None, args[0], args[1]
    else:
        user, topic, access = (None if args[0] == "-" else args[0]), args[1], args[2]
    if access not in ("read", "write", "subscribe"):
        raise _error(f"access must be read, write or subscribe, not {access!r}", EXIT_BAD_FILE)
    if (acl_file is None) == (config is None):
        raise _error("give one of --acl-file FILE or --config FILE", EXIT_BAD_FILE)
    if config is not None:
        try:
            acl_file = load_config(config, {"node.name": "acl-check"}).mqtt.acl_file
        except ConfigError as exc:
            raise _error(str(exc), EXIT_BAD_FILE) from None
        if acl_file is None:
            typer.echo(f"allowed: {config} sets no mqtt.acl_file, so every client may read and write every topic")
            raise typer.Exit(EXIT_ALLOWED)
    assert acl_file is not None
    try:
        acl = AclFile.load(acl_file)
    except AuthFileError as exc:
        raise _error(str(exc), EXIT_BAD_FILE) from None
    decision = acl.check(user, client_id, topic, access)  # type: ignore[arg-type]
    typer.echo(f"{'allowed' if decision.allowed else 'denied'}: {decision.reason}")
    raise typer.Exit(EXIT_ALLOWED if decision.allowed else EXIT_DENIED)


def node_reload(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="The node's config (its data_dir holds zmesh.pid).")] = None,
    pid: Annotated[int | None, typer.Option("--pid", help="The node's process id.")] = None,
) -> None:
    """Make a running node reload its trusted keys, password file and ACL file (SIGHUP).

    With --config, the password and ACL files are checked here first: if one is broken,
    nothing is sent (the node would keep its current rules anyway) and the error is shown."""
    from zmesh.cli.pidfile import is_zmesh_process, pid_file_path, read_pid
    from zmesh.config import ConfigError, load_config
    from zmesh.security.authority import Authority
    from zmesh.security.files import AuthFileError

    if (config is None) == (pid is None):
        raise _error("give one of --config FILE or --pid PID", 2)
    name = f"pid {pid}"
    if config is not None:
        try:
            node_config = load_config(config)
        except ConfigError as exc:
            raise _error(str(exc), 2) from None
        try:
            Authority.from_config(node_config.mqtt)
        except AuthFileError as exc:
            raise _error(f"{exc}; not reloading (the node keeps its current users and ACLs)", 2) from None
        pid_file = pid_file_path(node_config.data_dir)
        if pid_file is None:
            raise _error(f"{config} sets no node.data_dir, so the node writes no pid file; use --pid PID", 2)
        try:
            pid = read_pid(pid_file)
        except FileNotFoundError:
            raise _error(f"{pid_file} not found: is node {node_config.name} running?", 1) from None
        except (OSError, ValueError) as exc:
            raise _error(f"{pid_file}: {getattr(exc, 'strerror', None) or exc}", 1) from None
        name = f"node {node_config.name} (pid {pid})"
    assert pid is not None
    if is_zmesh_process(pid) is False:
        raise _error(f"process {pid} is not a running zmesh node (a stale pid file?)", 1)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise _error(f"no process {pid}", 1) from None
    except PermissionError:
        raise _error(f"not allowed to signal process {pid}", 1) from None
    typer.echo(f"sent SIGHUP to {name}; its log says whether the reload took")


def register(app: typer.Typer, node_app: typer.Typer) -> None:
    """Add `passwd`, `acl check` and `node reload` to the `zmesh` app."""
    app.command("passwd", context_settings=CONTEXT)(passwd)
    acl_app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True, help="Mosquitto-format ACL files.")
    acl_app.command("check")(acl_check)
    app.add_typer(acl_app, name="acl")
    node_app.command("reload")(node_reload)
