"""`zmesh authority`: the mesh authority that signs node identities (see
``zmesh.security.identity`` for the design and its threat model).

    zmesh authority create DIR                     # DIR/authority.pub + authority.key_secret
    zmesh authority signer DIR -g scanner -o scanner.signer   # a Secret for one group's pods
    zmesh authority issue DIR --name n1 --key n1.key -g collector -o n1.chain
    zmesh authority revoke DIR SERIAL... -o revoked.list
    zmesh authority show FILE --authority DIR/authority.pub

Heavy imports stay inside the commands (CLI start-up time).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

CONTEXT = {"help_option_names": ["--help"]}
app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True,
                  help="The mesh authority: sign node identities, revoke them.")

Dir = Annotated[Path, typer.Argument(help="The authority's directory (authority.pub, authority.key_secret).")]
Groups = Annotated[list[str], typer.Option("-g", "--group", help="A group (repeat for several).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(1)


@app.command()
def create(directory: Dir, force: Force = False) -> None:
    """Create an authority key pair. Keep authority.key_secret offline; put authority.pub in
    every node's configuration (mesh.authority)."""
    from zmesh.security.meshauthority import AuthorityFileError, create_authority

    try:
        public, secret = create_authority(directory, force=force)
    except (AuthorityFileError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"public key:  {public}  (configuration: mesh.authority)")
    typer.echo(f"secret key:  {secret}  (mode 0600: keep it offline)")


def _authority(directory: Path):  # type: ignore[no-untyped-def]
    from zmesh.security.meshauthority import SECRET_NAME, AuthorityFileError, load_authority_secret

    try:
        return load_authority_secret(directory / SECRET_NAME)
    except AuthorityFileError as exc:
        raise _fail(str(exc)) from None


@app.command()
def signer(
    directory: Dir,
    out: Annotated[Path, typer.Option("-o", "--out", help="The signer file to write (mode 0600).")],
    groups: Groups,
    days: Annotated[float, typer.Option("--days", help="How long the signer is valid.")] = 90.0,
    max_node_hours: Annotated[float, typer.Option("--max-node-hours", help="Longest node certificate it may issue.")] = 24.0,
    force: Force = False,
) -> None:
    """Create a signing key for GROUPS, certified by the authority: a Secret mounted by the
    pods of those groups, which issue themselves short-lived node certificates with it."""
    from zmesh.security.meshauthority import AuthorityFileError, create_signer

    key = _authority(directory)
    try:
        made = create_signer(key, out, groups, lifetime=days * 86400, max_node_lifetime=max_node_hours * 3600,
                             force=force)
    except (AuthorityFileError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{out}: signer for {', '.join(made.info.groups)}, serial {made.info.serial.hex()}, "
               f"valid until {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(made.info.not_after))}")


@app.command()
def issue(
    directory: Dir,
    name: Annotated[str, typer.Option("--name", help="The node's name.")],
    key: Annotated[Path, typer.Option("--key", help="The node's CURVE public key file (NAME.key).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="The certificate chain file to write.")],
    groups: Groups,
    hours: Annotated[float, typer.Option("--hours", help="How long the certificate is valid.")] = 24.0 * 30,
) -> None:
    """Issue a node certificate signed by the authority itself, for a node with a fixed key."""
    from zmesh.security import identity
    from zmesh.security.certs import CertError, load_public_key
    from zmesh.security.meshauthority import _write_public

    authority = _authority(directory)
    try:
        public = load_public_key(key)
        node = identity.issue_node(authority, public, name, groups, now=time.time(), lifetime=hours * 3600)
    except (CertError, ValueError) as exc:
        raise _fail(str(exc)) from None
    _write_public(out, identity.chain(node), force=True)
    typer.echo(f"{out}: {name} in {', '.join(sorted(set(groups))) or 'no group'}, valid {hours:g} h")


@app.command()
def revoke(
    directory: Dir,
    serials: Annotated[list[str], typer.Argument(help="Serials (hex) of node or signer certificates.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="The revocation list to write.")],
    seq: Annotated[int | None, typer.Option("--seq", help="Sequence number (default: now, in seconds).")] = None,
) -> None:
    """Write a signed revocation list: every serial in it stops being believed. The list is
    cumulative: name every serial still revoked, and give it a higher sequence number."""
    from zmesh.security.meshauthority import write_revocations

    authority = _authority(directory)
    try:
        raw = [bytes.fromhex(s) for s in serials]
        write_revocations(authority, out, raw, seq=int(time.time()) if seq is None else seq)
    except ValueError as exc:
        raise _fail(f"serials: {exc}") from None
    typer.echo(f"{out}: {len(raw)} serials revoked")


@app.command()
def show(
    file: Annotated[Path, typer.Argument(help="A certificate chain, signer file or revocation list.")],
    authority: Annotated[Path, typer.Option("--authority", help="The authority's public key file.")],
) -> None:
    """Verify FILE against the authority and say what it is, or exactly what is wrong."""
    from zmesh.security import identity
    from zmesh.security.meshauthority import AuthorityFileError, load_authority_keys, load_signer

    try:
        keys = load_authority_keys(authority)
        data = file.read_bytes()
    except (AuthorityFileError, OSError) as exc:
        raise _fail(str(exc)) from None
    now = time.time()

    def until(t: int) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))

    try:
        if data.lstrip().startswith(b"{"):
            made = load_signer(file)
            found = identity.verify_chain(  # a signer is checked through a throwaway node under it
                identity.chain(identity.issue_node(made.key, b"0" * 40, "check", made.info.groups, now=now,
                                                   lifetime=1), made.certificate), keys, now=now)
            typer.echo(f"signer for {', '.join(found.groups)}: valid until {until(made.info.not_after)}, "
                       f"serial {made.info.serial.hex()}, node certificates up to {made.info.max_node_lifetime} s")
            return
        try:
            listed = identity.verify_revocations(data, keys, now=now)
        except identity.IdentityError as exc:
            if exc.reason != "malformed":
                raise
        else:
            typer.echo(f"revocation list {listed.seq}: {len(listed.serials)} serials")
            for serial in sorted(listed.serials):
                typer.echo(f"  {serial.hex()}")
            return
        found = identity.verify_chain(data, keys, now=now)
    except (identity.IdentityError, AuthorityFileError) as exc:
        raise _fail(f"{file}: {exc}") from None
    typer.echo(f"node {found.name}: groups {', '.join(found.groups) or '-'}, key {found.curve_key.decode()}, "
               f"valid until {until(found.not_after)}, serials {' '.join(s.hex() for s in found.serials)}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="authority")
