"""Mosquitto password files: the formats mosquitto_passwd 2.0 writes, verification, errors,
and the `zmesh passwd` editor (mosquitto_passwd's semantics, atomic 0600 writes)."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.cli.passwd import (
    USAGE,
    PasswdError,
    Request,
    parse_request,
    plan_delete,
    plan_set,
    plan_upgrade,
    run,
)
from zmesh.security.passwd import (
    PasswordFile,
    PasswordFileError,
    hash_password,
    parse_hash,
)

# Written by mosquitto_passwd 2.0.11: `-c -b f alice secret`, `-H sha512 -b f bob secret2`,
# `-I 1000 -b f carol pw3`.
ALICE = "alice:$7$101$GH2E6ts0+HlfOmwG$GREmCk6insAKeNInYXooDKJNlWB273clg5COsKvRxN/X0kgf4kBC9kl9LPrsk4nqMX18552hJiuOuZiP+sieaw=="
BOB = "bob:$6$MOp+No0YHbrq6bNm$JLr4QTl72m8fOH50yYm0x/bgmzMKhm0Yyi1MU35XSBUTXJqihbCPuMeeiW+6n4eeVcwmloFUyw7ZBTDHAXGdvA=="
ALICE_HASH = ALICE.split(":", 1)[1]
PBKDF2_LINE = re.compile(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==")
SHA512_LINE = re.compile(r"\$6\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==")


def test_verifies_what_mosquitto_passwd_wrote() -> None:
    pw = PasswordFile.parse(f"{ALICE}\n{BOB}\n", "pw")
    assert pw.verify("alice", b"secret") and pw.verify("bob", b"secret2")
    assert not pw.verify("alice", b"secret2") and not pw.verify("bob", b"secret")
    assert not pw.verify("alice", b"") and not pw.verify("carol", b"secret")
    assert pw.users == ("alice", "bob") and "alice" in pw and len(pw) == 2


@pytest.mark.parametrize("scheme, shape", [("sha512-pbkdf2", PBKDF2_LINE), ("sha512", SHA512_LINE)])
def test_hash_password_writes_mosquitto_passwd_format(scheme: str, shape: re.Pattern[str]) -> None:
    hashed = hash_password(b"hunter2", scheme)
    assert shape.fullmatch(hashed), hashed  # 12-byte salt, 64-byte hash, padded base64
    parsed = parse_hash(hashed)
    assert parsed.verify(b"hunter2") and not parsed.verify(b"hunter3")
    assert hash_password(b"hunter2", scheme) != hashed  # a fresh salt each time


def test_hash_computation_is_mosquittos() -> None:
    # $7$: PBKDF2-HMAC-SHA512(password, salt, iterations, 64); $6$: SHA-512(password || salt).
    h7 = parse_hash(hash_password(b"pw", iterations=7))
    assert h7.iterations == 7 and h7.digest == hashlib.pbkdf2_hmac("sha512", b"pw", h7.salt, 7, 64)
    h6 = parse_hash(hash_password(b"pw", "sha512"))
    assert h6.digest == hashlib.sha512(b"pw" + h6.salt).digest()


def test_bad_scheme_and_iterations() -> None:
    with pytest.raises(ValueError, match="unknown hash type"):
        hash_password(b"x", "md5")
    with pytest.raises(ValueError, match="iterations"):
        hash_password(b"x", iterations=0)


def test_comments_blank_lines_crlf_blanks_and_last_line_wins() -> None:
    carol_old = "carol:" + hash_password(b"old")
    carol_new = "carol:" + hash_password(b"new")
    text = f"# users\r\n\r\n  {ALICE}  \r\n\t\n{carol_old}\n{carol_new}\n"
    pw = PasswordFile.parse(text, "pw")
    assert pw.verify("alice", b"secret")
    # Mosquitto's hash table finds the newest entry for a name: checked against 2.0.11.
    assert pw.verify("carol", b"new") and not pw.verify("carol", b"old")


def test_an_unknown_user_costs_as_much_as_a_known_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hashlib.pbkdf2_hmac

    def spy(name: str, password: bytes, salt: bytes, iterations: int, dklen: int | None = None) -> bytes:
        calls.append(iterations)
        return real(name, password, salt, iterations, dklen)

    pw = PasswordFile.parse("a:" + hash_password(b"x", iterations=3000) + "\n", "pw")
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", spy)
    assert not pw.verify("nobody", b"x")
    assert not pw.verify("a", b"y")
    assert calls == [3000, 3000]


SECRET_B64 = "GREmCk6insAKeNInYXooDKJNlWB273clg5COsKvRxN"


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("no colon here", "no ':' found"),
        (":" + ALICE_HASH, "username is empty"),
        ("alice:", "no password hash"),
        ("alice:plaintext-password", "not hashed"),
        ("alice:$5$abc$def", "unknown hash type"),
        ("alice:$7$101$GH2E6ts0+HlfOmwG", "4 fields"),
        ("alice:$6$GH2E6ts0+HlfOmwG", "3 fields"),
        ("alice:$7$0$GH2E6ts0+HlfOmwG$" + ALICE_HASH.split("$")[-1], "from 1 to"),
        ("alice:$7$x1$GH2E6ts0+HlfOmwG$" + ALICE_HASH.split("$")[-1], "not a number"),
        ("alice:$7$101$GH2E6ts0!HlfOmwG$" + ALICE_HASH.split("$")[-1], "salt is not base64"),
        ("alice:$7$101$GH2E6ts0HlfOmw$" + ALICE_HASH.split("$")[-1], "salt is 10 bytes"),
        ("alice:$7$101$GH2E6ts0+HlfOmwG$" + SECRET_B64, "hash is 31 bytes"),
        (ALICE + ":extra", "unexpected ':'"),
        ("ali\x00ce:" + ALICE_HASH, "NUL"),
    ],
)
def test_errors_name_file_and_line_and_never_the_secret(line: str, fragment: str) -> None:
    with pytest.raises(PasswordFileError) as info:
        PasswordFile.parse(f"# header\n{ALICE}\n{line}\n", "/etc/zmesh/passwd")
    message = str(info.value)
    assert message.startswith("/etc/zmesh/passwd:3: "), message
    assert info.value.line == 3
    assert fragment in message
    assert "plaintext-password" not in message and SECRET_B64 not in message and "HlfOmw" not in message


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PasswordFileError, match="not found"):
        PasswordFile.load(tmp_path / "missing")
    bad = tmp_path / "latin1"
    bad.write_bytes(f"{ALICE}\nj\xf6rg:x\n".encode("latin-1"))
    with pytest.raises(PasswordFileError, match=rf"^{re.escape(str(bad))}:2: not UTF-8"):
        PasswordFile.load(bad)
    good = tmp_path / "good"
    good.write_text(ALICE + "\n")
    assert PasswordFile.load(good).verify("alice", b"secret")


def test_repr_shows_no_hash() -> None:
    pw = PasswordFile.parse(ALICE + "\n", "pw")
    parsed = parse_hash(ALICE_HASH)
    assert "GH2E" not in repr(pw) and "GH2E" not in repr(parsed)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab:$67\n#=+/ \t\r0\x00") + ["GH2E6ts0+HlfOmwG", ALICE_HASH, "\nalice:"]), max_size=40).map("".join))
def test_parser_raises_only_its_own_error(text: str) -> None:
    # Pieces of real lines, so that the fuzzer reaches the hash parser, not only the splitter.
    try:
        PasswordFile.parse(text, "fuzz")
    except PasswordFileError as exc:
        assert str(exc).startswith("fuzz:")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parser_raises_only_its_own_error_on_any_text(text: str) -> None:
    try:
        PasswordFile.parse(text, "fuzz")
    except PasswordFileError as exc:
        assert str(exc).startswith("fuzz:")


@settings(max_examples=25, deadline=None)
@given(
    user=st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters=":#"), min_size=1, max_size=20),
    password=st.binary(max_size=40),
    scheme=st.sampled_from(["sha512", "sha512-pbkdf2"]),
)
def test_round_trip(user: str, password: bytes, scheme: str) -> None:
    pw = PasswordFile.parse(f"{user}:{hash_password(password, scheme, iterations=3)}\n", "pw")
    assert pw.verify(user, password)
    assert not pw.verify(user, password + b"x")


# ---------------------------------------------------------------------------- zmesh passwd


def request(args: list[str], **flags: object) -> Request:
    options: dict[str, object] = {"create": False, "batch": False, "delete": False, "update": False,
                                  "scheme": None, "iterations": None}
    options.update(flags)
    return parse_request(args, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "args, flags, message",
    [
        (["f", "u"], {"create": True, "delete": True}, "Error: -c and -D cannot be used together."),
        (["f"], {"create": True, "update": True}, "Error: -c and -U cannot be used together."),
        (["f"], {"delete": True, "update": True}, "Error: -D and -U cannot be used together."),
        (["f", "u"], {"delete": True, "batch": True}, "Error: -b and -D cannot be used together."),
        (["f", "u"], {"create": True, "batch": True}, "Error: -c argument given but password file, username, or password missing."),
        (["f"], {"create": True}, "Error: -c argument given but password file or username missing."),
        (["f"], {"delete": True}, "Error: -D argument given but password file or username missing."),
        (["f", "u"], {"update": True}, "Error: -U argument given but password file missing."),
        (["f", "u", "p"], {}, USAGE),
        (["f", "u"], {"batch": True}, USAGE),
        (["f", "a:b"], {}, "Error: Username must not contain the ':' character."),
        (["f", "a\tb"], {}, "Error: Username must not contain control characters."),
        (["f", " a"], {}, "Error: Username must not be empty or start or end with white space."),
        (["f", "u"], {"scheme": "md5"}, "Error: Unknown hash type 'md5'"),
        (["f", "u"], {"iterations": 0}, "Error: Number of iterations must be > 0."),
    ],
)
def test_arguments_checked_as_mosquitto_passwd(args: list[str], flags: dict[str, object], message: str) -> None:
    with pytest.raises(PasswdError) as info:
        request(args, **flags)
    assert str(info.value) == message


def test_plan_set_replaces_first_drops_duplicates_keeps_comments() -> None:
    text = f"# team\n{ALICE}\n\nbob:x$\n{ALICE}\n"
    assert plan_set(text, "f", "alice", "NEW") == "# team\nalice:NEW\n\nbob:x$\n"
    assert plan_set(text, "f", "carol", "C").endswith("bob:x$\nalice:" + ALICE_HASH + "\ncarol:C\n")


def test_plan_delete_and_missing_user() -> None:
    assert plan_delete(f"{ALICE}\n{BOB}\n", "f", "alice") == BOB + "\n"
    with pytest.raises(PasswdError, match=r"^Warning: User carol not found in password file\.$"):
        plan_delete(f"{ALICE}\n", "f", "carol")


def test_plan_upgrade_hashes_plaintext_only() -> None:
    out = plan_upgrade(f"# c\nx:plain\n{ALICE}\n", "f", lambda pw: f"H({pw})")
    assert out == f"# c\nx:H(plain)\n{ALICE}\n"  # mosquitto_passwd would hash alice's hash


def test_corrupt_file_is_refused_with_its_line() -> None:
    with pytest.raises(PasswdError, match=r"^Error: Corrupt password file at line 2: expected username:hash"):
        plan_set(f"{ALICE}\njunk\n", "f", "u", "h")


def test_run_writes_0600_atomically_and_mosquitto_can_parse(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    os.umask(0o022)  # the default of most shells: the file must still be 0600
    run(request([str(path), "alice", "pw1"], create=True, batch=True), input)
    run(request([str(path), "bob", "pw2"], batch=True, scheme="sha512"), input)
    run(request([str(path), "carol"], iterations=500), lambda prompt: "pw3")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pw = PasswordFile.load(path)
    assert pw.verify("alice", b"pw1") and pw.verify("bob", b"pw2") and pw.verify("carol", b"pw3")
    assert path.read_text().splitlines()[2].startswith("carol:$7$500$")
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]  # no temporary left behind
    run(request([str(path), "bob"], delete=True), input)
    assert PasswordFile.load(path).users == ("alice", "carol")


def test_run_follows_a_symlink_to_its_target(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.write_text(ALICE + "\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    run(request([str(link), "bob", "pw"], batch=True), input)
    assert link.is_symlink() and PasswordFile.load(target).verify("bob", b"pw")


def test_run_prompts_twice_and_refuses_mismatch_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "p"
    answers = iter(["a", "b"])
    with pytest.raises(PasswdError, match=r"^Error: Passwords do not match\.$"):
        run(request([str(path), "u"], create=True), lambda prompt: next(answers))
    with pytest.raises(PasswdError, match=r"^Error: Empty password\.$"):
        run(request([str(path), "u"], create=True), lambda prompt: "")
    assert not path.exists()
    with pytest.raises(PasswdError, match=r"^Error: Unable to open password file .*No such file"):
        run(request([str(path), "u", "p"], batch=True), input)
