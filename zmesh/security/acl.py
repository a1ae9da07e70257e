"""Mosquitto ``acl_file``: parse and check, with Mosquitto 2.0's semantics.

The format (``mosquitto.conf(5)``, ``acl_file``)::

    # a comment: '#' in the first column
    topic [read|write|readwrite|deny] <topic filter>    # no access word: readwrite
    user <username>
    pattern [read|write|readwrite|deny] <filter with %u and %c>

What Mosquitto 2.0 does (``src/security_default.c``), and so do we, checked cell by cell
against a real Mosquitto 2.0.11 in ``tests/integration/mqtt/test_mosquitto_compat.py``:

* ``topic`` lines before the first ``user`` line apply to anonymous clients only; after a
  ``user`` line, to that user only. ``pattern`` lines apply to every client, wherever they
  are in the file. A user with no ``topic`` lines, in a file without patterns, gets nothing.
* A check goes through the client's ``topic`` rules first, then the patterns; within each
  list the ``deny`` rules come first. The first rule whose filter matches the topic decides
  if it is a deny (refused) or grants the access asked for (allowed); a matching rule that
  grants only the other access is passed over. So a user's own ``topic read x/#`` wins
  over a ``pattern deny x/#``, and a user's ``topic deny`` wins over any pattern.
* Filters match as MQTT subscriptions do, ``$`` rule included: ``#`` and ``+`` at the start
  do not match a topic starting with ``$``.
* Patterns: ``%u`` is replaced by the username and ``%c`` by the client id, as plain text
  (a ``/`` in a username therefore spans levels, as in Mosquitto); a pattern holding ``%u``
  is skipped for an anonymous client. When the file has patterns, a username or client id
  containing ``+`` or ``#`` is refused once the client's own ``topic`` rules did not allow
  (it could otherwise widen a pattern into a wildcard).
* SUBSCRIBE: Mosquitto 2.0's ACL file check grants every subscription (its source says
  "FIXME - implement ACL subscription strings"; a real 2.0.11 answers SUBACK 0 to a
  subscription to a denied topic) and checks ``read`` for each message delivered, retained
  ones included. ``check(..., "subscribe")`` answers the same.
* Parsing: fields are separated by single spaces (a tab is not a separator, as in
  Mosquitto), trailing white space is ignored, the topic is the rest of the line (it may
  contain spaces) and must be a valid subscription filter. ``topic read`` alone is a rule
  for the topic named ``read``, as in Mosquitto. Any other first word is an error.

Pure: no I/O apart from ``AclFile.load`` reading the one file it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from zmesh.security.files import AuthFileError, read_text

Access = Literal["read", "write", "subscribe"]
READ, WRITE = 1, 2  # Mosquitto's MOSQ_ACL_READ / MOSQ_ACL_WRITE bits; deny is 0
ACCESS_WORDS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": 0}
_ACCESS_BITS = {"read": READ, "write": WRITE}
MAX_TOPIC = 65535
MAX_LEVELS = 201  # Mosquitto's TOPIC_HIERARCHY_LIMIT: at most 200 '/'
# Mosquitto strips line ends with C isspace(); Python's str.strip() would also eat Unicode.
BLANKS = " \t\n\v\f\r"
_PATTERN_CACHE_LIMIT = 4096


class AclError(AuthFileError):
    """An ACL file that cannot be used; ``str()`` is ``"<file>:<line>: <what>"``."""


@dataclass(frozen=True)
class Decision:
    """The answer to one check and why: the rule (and its line) that decided, if any."""

    allowed: bool
    line: int | None
    reason: str


@dataclass(frozen=True)
class Rule:
    kind: Literal["topic", "pattern"]
    access: int  # READ | WRITE bits; 0 for deny
    filter: str
    line: int
    text: str  # the line as written, for explanations


def check_filter(filt: str) -> str | None:
    """Why ``filt`` is not a valid subscription filter (Mosquitto's rules), or None."""
    if len(filt.encode("utf-8", "surrogatepass")) > MAX_TOPIC:
        return f"the topic is longer than {MAX_TOPIC} bytes"
    levels = filt.split("/")
    if len(levels) > MAX_LEVELS:
        return f"the topic has more than {MAX_LEVELS} levels"
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            return f"'+' must be a whole level, in {filt!r}"
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"'#' must be the whole last level, in {filt!r}"
    return None


def _compile(filt: str) -> tuple[str, ...]:
    return tuple(filt.split("/"))


def _matches(levels: tuple[str, ...], topic_levels: list[str]) -> bool:
    """MQTT filter matching on split levels; the ``$`` rule is the caller's (``_first_dollar``)."""
    n = len(topic_levels)
    for i, level in enumerate(levels):
        if level == "#":
            return True  # also matches the parent: "a/#" matches "a"
        if i >= n:
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(levels) == n


def _dollar_ok(filt: str, topic: str) -> bool:
    """The ``$`` rule both ways, as mosquitto_topic_matches_sub applies it."""
    return (filt[:1] == "$") == (topic[:1] == "$")


def _substitute(pattern: str, username: str | None, client_id: str) -> str:
    """Replace %c and %u in one left-to-right pass, exactly as Mosquitto's loop does."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "%" and i < n - 1:
            nxt = pattern[i + 1]
            if nxt == "c":
                out.append(client_id)
                i += 2
                continue
            if nxt == "u" and username is not None:
                out.append(username)
                i += 2
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def _parse_line(line: str, number: int, source: str) -> tuple[str, str | None, Rule | None]:
    """One non-comment line -> (keyword, username for "user", rule for topic/pattern)."""
    if "\x00" in line:
        raise AclError.at(source, number, "the line contains a NUL character")
    keyword, _, rest = line.lstrip(" ").partition(" ")
    if keyword in ("topic", "pattern"):
        rest = rest.lstrip(" ")
        if not rest:
            raise AclError.at(source, number, f"empty topic after {keyword!r}")
        access_word, space, topic = rest.partition(" ")
        topic = topic.strip(BLANKS)
        if not space or not topic:
            # One word only: it is the topic, with readwrite access (Mosquitto's reading).
            access_word, topic = "readwrite", access_word
        if access_word not in ACCESS_WORDS:
            raise AclError.at(
                source, number, f"invalid access {access_word!r} (expected read, write, readwrite or deny)"
            )
        problem = check_filter(topic)
        if problem:
            raise AclError.at(source, number, f"invalid ACL topic: {problem}")
        kind: Literal["topic", "pattern"] = "topic" if keyword == "topic" else "pattern"
        return keyword, None, Rule(kind, ACCESS_WORDS[access_word], topic, number, line.strip(BLANKS))
    if keyword == "user":
        name = rest.strip(BLANKS)
        if not name:
            raise AclError.at(source, number, "missing username after 'user'")
        return keyword, name, None
    hint = ""
    if keyword.lstrip(BLANKS).startswith("#"):
        hint = " (a comment must start with '#' in the first column)"
    elif "\t" in keyword:
        hint = " (separate fields with spaces: a tab is not a separator)"
    shown = keyword if len(keyword) <= 40 else keyword[:37] + "..."
    raise AclError.at(source, number, f"unknown keyword {shown!r}, expected topic, user or pattern{hint}")


class _RuleList:
    """One list of rules as Mosquitto keeps it: deny rules first, then the rest in order."""

    __slots__ = ("rules",)

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = [r for r in rules if r.access == 0] + [r for r in rules if r.access != 0]


class AclFile:
    """The rules of one ACL file; ``check`` answers one access question."""

    def __init__(
        self,
        users: dict[str | None, list[Rule]],
        patterns: list[Rule],
        source: str,
        warnings: tuple[str, ...] = (),
    ) -> None:
        self.source = source
        self.warnings = warnings
        # Precompiled per user: (rule, filter levels) with deny rules first.
        self._users: dict[str | None, list[tuple[Rule, tuple[str, ...]]]] = {
            user: [(r, _compile(r.filter)) for r in _RuleList(rules).rules] for user, rules in users.items()
        }
        self._patterns = _RuleList(patterns).rules
        self._pattern_cache: dict[tuple[str | None, str], list[tuple[Rule, str, tuple[str, ...]]]] = {}

    @classmethod
    def parse(cls, text: str, source: str) -> AclFile:
        users: dict[str | None, list[Rule]] = {}
        patterns: list[Rule] = []
        warnings: list[str] = []
        user: str | None = None
        pieces = text.split("\n")
        if pieces[-1] == "":
            pieces.pop()
        for number, raw in enumerate(pieces, 1):
            line = raw.rstrip(BLANKS)
            if not line or line.startswith("#"):
                continue
            keyword, name, rule = _parse_line(line, number, source)
            if keyword == "user":
                user = name
            elif rule is not None and rule.kind == "topic":
                users.setdefault(user, []).append(rule)
            elif rule is not None:
                if "%c" not in rule.filter and "%u" not in rule.filter:
                    warnings.append(f"{source}:{number}: pattern {rule.filter!r} has neither %c nor %u")
                patterns.append(rule)
        return cls(users, patterns, source, tuple(warnings))

    @classmethod
    def load(cls, path: Path) -> AclFile:
        return cls.parse(read_text(path, "ACL file", AclError), str(path))

    @property
    def users(self) -> tuple[str | None, ...]:
        """The users with ``topic`` rules (None: the anonymous rules before any ``user``)."""
        return tuple(self._users)

    def _where(self, rule: Rule) -> str:
        return f"`{rule.text}` at {self.source}:{rule.line}"

    def _patterns_for(self, username: str | None, client_id: str) -> list[tuple[Rule, str, tuple[str, ...]]]:
        key = (username, client_id)
        compiled = self._pattern_cache.get(key)
        if compiled is None:
            compiled = []
            for rule in self._patterns:
                if username is None and "%u" in rule.filter:
                    continue  # Mosquitto skips %u patterns for anonymous clients
                filt = _substitute(rule.filter, username, client_id)
                compiled.append((rule, filt, _compile(filt)))
            if len(self._pattern_cache) >= _PATTERN_CACHE_LIMIT:
                self._pattern_cache.clear()  # a bound, not an LRU: clients reconnect rarely
            self._pattern_cache[key] = compiled
        return compiled

    def check(self, username: str | None, client_id: str, topic: str, access: Access) -> Decision:
        """May this client ``access`` this topic? ``username`` None is an anonymous client."""
        if access == "subscribe":
            return Decision(True, None, "Mosquitto 2.0 grants every SUBSCRIBE; read is checked per message")
        bit = _ACCESS_BITS.get(access)
        if bit is None:
            raise ValueError(f"access must be read, write or subscribe, not {access!r}")
        who = "anonymous clients" if username is None else f"user {username!r}"
        own = self._users.get(username)
        if not own and not self._patterns:
            return Decision(False, None, f"no rules for {who} and no patterns in {self.source}")
        # An invalid topic (empty, or with + or #) matches nothing, as in Mosquitto.
        valid = bool(topic) and "+" not in topic and "#" not in topic
        levels = topic.split("/") if valid else []
        if own and valid:
            for rule, filt_levels in own:
                if _dollar_ok(rule.filter, topic) and _matches(filt_levels, levels):
                    if rule.access == 0:
                        return Decision(False, rule.line, f"denied by {self._where(rule)}")
                    if rule.access & bit:
                        return Decision(True, rule.line, f"allowed by {self._where(rule)}")
        if self._patterns:
            if username is not None and ("+" in username or "#" in username):
                return Decision(False, None, "the username contains + or #, so no pattern applies to it (as in Mosquitto)")
            if "+" in client_id or "#" in client_id:
                return Decision(False, None, "the client id contains + or #, so no pattern applies to it (as in Mosquitto)")
            if valid:
                for rule, filt, filt_levels in self._patterns_for(username, client_id):
                    if _dollar_ok(filt, topic) and _matches(filt_levels, levels):
                        if rule.access == 0:
                            return Decision(False, rule.line, f"denied by {self._where(rule)}")
                        if rule.access & bit:
                            return Decision(True, rule.line, f"allowed by {self._where(rule)}")
        return Decision(False, None, f"no rule grants {access} on {topic!r} to {who}")

    def __repr__(self) -> str:
        rules = sum(len(r) for r in self._users.values())
        return f"AclFile({self.source!r}, {rules} topic rules, {len(self._patterns)} patterns)"
