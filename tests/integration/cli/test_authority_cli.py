"""`zmesh authority`: create, signer, issue, revoke, show, as an operator types them."""

from __future__ import annotations

import stat
from pathlib import Path

from tests.helpers import make_certs, zmesh_cli


def test_authority_files_and_statements_round_trip(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    assert zmesh_cli("authority", "create", str(ca)).returncode == 0
    assert stat.S_IMODE((ca / "authority.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.stat().st_mode) == 0o700
    again = zmesh_cli("authority", "create", str(ca))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr and "Traceback" not in again.stderr

    signer = tmp_path / "scanner.signer"
    made = zmesh_cli("authority", "signer", str(ca), "-g", "scanner", "-o", str(signer))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(signer.stat().st_mode) == 0o600
    shown = zmesh_cli("authority", "show", str(signer), "--authority", str(ca / "authority.pub"))
    assert shown.returncode == 0 and shown.stdout.startswith("signer for scanner"), shown.stderr

    certs = make_certs(tmp_path / "certs", ["n1"])
    chain = tmp_path / "n1.chain"
    issued = zmesh_cli("authority", "issue", str(ca), "--name", "n1", "--key", str(certs / "n1.key"),
                       "-g", "collector", "-o", str(chain))
    assert issued.returncode == 0, issued.stderr
    shown = zmesh_cli("authority", "show", str(chain), "--authority", str(ca / "authority.pub"))
    assert shown.returncode == 0 and shown.stdout.startswith("node n1: groups collector"), shown.stderr
    serial = shown.stdout.rsplit("serials ", 1)[1].split()[0]

    revoked = tmp_path / "revoked.list"
    assert zmesh_cli("authority", "revoke", str(ca), serial, "-o", str(revoked)).returncode == 0
    listed = zmesh_cli("authority", "show", str(revoked), "--authority", str(ca / "authority.pub"))
    assert listed.returncode == 0 and serial in listed.stdout

    # Another authority's key does not vouch for our node: said plainly, exit 1, no traceback.
    assert zmesh_cli("authority", "create", str(tmp_path / "other")).returncode == 0
    refused = zmesh_cli("authority", "show", str(chain), "--authority", str(tmp_path / "other" / "authority.pub"))
    assert refused.returncode == 1 and "not issued by a trusted authority" in refused.stderr
    assert "Traceback" not in refused.stderr
